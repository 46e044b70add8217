"""The HTTP path's three servers (one module each, so each server imports only its own framework)
and the wrk driver."""
