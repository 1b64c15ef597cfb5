"""
Bundled example services for the gateway to proxy to.

They let the whole path (a page, JSON over HTTP, WebSocket rooms) be seen working
without a service of your own. Each module stands alone; import the one you need,
e.g. ``twisted_gateway.demo.chat.build_chat_site``.
"""
