"""twisted_gateway: an API gateway on Twisted with a paired Autobahn WebSocket relay."""

__version__ = "0.1.0"
