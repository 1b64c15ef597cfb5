"""The ``twistd wsgateway`` plugin: lazy, so ``twistd --help`` imports nothing heavy."""

from twisted.application.service import ServiceMaker

wsgateway = ServiceMaker(
    "twisted_gateway",
    "twisted_gateway.tap",
    "API gateway: HTTP reverse proxy and WebSocket relay configured by tap.cfg",
    "wsgateway",
)
