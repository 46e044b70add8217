"""The fault-injection suite: the reliability figures, measured with real processes and ``kill -9``.

Run it from the repository root::

    .venv/bin/python -m tests.faults                      # short sizes, fresh SQLite broker (~1-2 min)
    .venv/bin/python -m tests.faults --full               # full sizes (10,000 events, 20-30 kills; minutes)
    .venv/bin/python -m tests.faults --full --broker rabbitmq   # this machine's RabbitMQ, swept after
    .venv/bin/python -m tests.faults --broker all         # SQLite, RabbitMQ, NATS, Redis, PostgreSQL
    .venv/bin/python -m tests.faults --broker amqp://user:pw@host/   # any broker URL (left as is)
    .venv/bin/python -m tests.faults --scenario poison --seed 42 --keep /tmp/faults

Options: ``--broker B`` (repeatable; ``sqlite`` — the default — is a fresh broker file
``sqlite:///<tmp>/broker.db?lease=1`` per scenario; ``rabbitmq``, ``nats``, ``redis``, ``postgres``
are this machine's servers on 127.0.0.1, each scenario in a namespace of its own that is swept
afterwards, with short leases; ``all`` is SQLite plus those four; any other value is a broker URL,
used as it is; a server that is down or a URL whose ``connect()`` fails is reported and skipped),
``--full``, ``--scenario NAME`` (repeatable), ``--seed N`` (schedules and data; process timing is
not reproducible), ``--keep DIR`` (keep logs and databases), ``--quiet``. It prints progress on
stderr, then a table of the figures with the command that reproduces them; the exit status is 1 if
a checked figure is off. ``pytest`` runs every scenario at its short size on SQLite, and the
consumer-kill scenario at its short size on RabbitMQ, NATS and Redis (``tests/faults/test_faults.py``,
marked ``slow``).

Scenarios (full sizes; each uses fresh service, topic and group names, so runs on a shared broker
do not see each other, and bounds its own time; every process is stopped by its PID):

1. :mod:`~tests.faults.kills` — 10,000 events, 4 consumer processes of an idempotent handler, 20
   ``kill -9`` (before the effect / between effect commit and ack / after ack / at a random moment),
   each killed process restarted: lost 0, effects applied twice 0, redeliveries absorbed by the
   inbox reported.
2. :mod:`~tests.faults.poison` — 10,000 events with 1 % poison and 0.1 % crashers,
   ``RetryPolicy(max_attempts=4)``: dead letters with their reason, attempts and diagnostics; then
   the handler is fixed and ``callcast dlq replay --all`` (the real CLI) applies each exactly once.
3. :mod:`~tests.faults.ordering` — 10,000 events on 100 keys, shuffled in windows of 50, folded by a
   ``sequenced=True`` handler in 3 processes: every key's state equals the in-order fold; parked
   and stale counts.
4. :mod:`~tests.faults.outbox` — 5,000 producer transactions (5 % rolled back) with 30 ``kill -9``
   of the producer around commit, relay publish and relay delete, and an idempotent consumer
   downstream: lost 0, events of rolled-back transactions 0, duplicate effects 0.

Kill points inside a process come from :mod:`callcast.testing.faults` (a broker wrapper that can
``SIGKILL`` its process before or after ``publish``/``ack``/``nack``, configured by
``$CALLCAST_FAULTS``) and from points the test apps declare themselves. The child processes are
``python -m tests.faults.worker`` (:mod:`tests.faults.worker`): ``callcast run --no-http`` with the
wrapped broker.

Crashers and their neighbours: a process killed by a crasher takes the other deliveries it held
with it, and those still on their way into it, and the broker counts a delivery for each.
:mod:`callcast.crashes` keeps the evidence (a journal of what each process holds, a marker for the
suspect it runs alone, the failures and the deaths), so a crash loop is dead-lettered on evidence,
the neighbours are not, and ``dlqattempts`` counts a message's own runs; scenario 2 checks all
three.
"""
