"""The shop: the reference app of callcast, its demo and its end-to-end test.

    users      POST /users, GET /users/{id}, rpc lookup          publishes UserSignedUp
    emails     GET /emails?to=                                   on UserSignedUp: welcome email
    orders     POST /orders, GET /orders/{id}                    calls users.lookup, payments.authorize;
                                                                 publishes OrderPlaced;
                                                                 on StockReserved / StockShort
    payments   rpc authorize
    inventory  GET /inventory                                    on OrderPlaced: reserve stock;
                                                                 publishes StockReserved / StockShort

Run it: ``callcast run examples.shop:app`` (http://127.0.0.1:8000).
"""

from callcast import App
from examples.shop.emails import emails
from examples.shop.inventory import inventory
from examples.shop.orders import orders
from examples.shop.payments import payments
from examples.shop.users import users

app = App([users, emails, orders, payments, inventory], name="shop")

__all__ = ["app"]
