"""
The Twisted and Autobahn classes this package extends, with the methods it
calls on them annotated.

Both libraries ship ``py.typed`` but leave these methods unannotated, and
``mypy --strict`` refuses a call to an unannotated method made through a
subclass or ``super()`` (``untyped_calls_exclude`` in ``pyproject.toml``
does not reach those: mypy issues 16651 and 16653). The signatures are
written here once, for the type checker only: at run time every name is the
library's own class. Autobahn's are imported on first use, so what imports
this module for Twisted's classes alone (``tap.Options``, a ``--check`` run,
a start that stops at a bad config) pays no Autobahn import.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Callable, Protocol, Sequence

from twisted.application import service
from twisted.protocols import basic, policies
from twisted.python import usage
from twisted.web import client, http, resource, server

__all__ = [
    "HTTPChannel",
    "Int32StringReceiver",
    "MultiService",
    "FileBodyProducer",
    "Options",
    "Request",
    "Resource",
    "Service",
    "Site",
    "WrappingFactory",
    "WebSocketClientFactory",
    "WebSocketClientProtocol",
    "WebSocketServerFactory",
    "WebSocketServerProtocol",
]

if TYPE_CHECKING:
    from autobahn.twisted import websocket
    from twisted.application.service import IServiceCollection
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IAddress, IConsumer, IDelayedCall, IProtocolFactory, IReactorTime, ITransport
    from twisted.python.failure import Failure
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IRequest
    from twisted.web.resource import IResource

    class HTTPChannel(http.HTTPChannel):
        def __init__(self) -> None: ...
        def connectionMade(self) -> None: ...
        def dataReceived(self, data: bytes) -> None: ...
        def allHeadersReceived(self) -> None: ...
        def allContentReceived(self) -> None: ...
        def requestDone(self, request: IRequest) -> None: ...
        def resetTimeout(self) -> None: ...
        def checkPersistence(self, request: IRequest, version: bytes) -> bool: ...
        def _respondToBadRequestAndDisconnect(self) -> None: ...
        def connectionLost(self, reason: Failure = ...) -> None: ...
        def loseConnection(self) -> None: ...
        def setTimeout(self, period: float | None) -> float | None: ...
        def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall: ...
        def writeHeaders(
            self, version: bytes, code: bytes, reason: bytes, headers: Headers | Sequence[tuple[bytes, bytes]]
        ) -> None: ...
        def isSecure(self) -> bool: ...
        def getPeer(self) -> IAddress: ...

    class Int32StringReceiver(basic.Int32StringReceiver):
        def sendString(self, string: bytes) -> None: ...

    class WrappingFactory(policies.WrappingFactory):
        def __init__(self, wrappedFactory: IProtocolFactory) -> None: ...

    class Service(service.Service):
        def privilegedStartService(self) -> None: ...
        def startService(self) -> None: ...
        def stopService(self) -> Deferred[None] | None: ...
        def setServiceParent(self, parent: IServiceCollection) -> None: ...

    class MultiService(service.MultiService):
        def __init__(self) -> None: ...
        def privilegedStartService(self) -> None: ...
        def startService(self) -> None: ...
        def stopService(self) -> Deferred[None]: ...
        def setServiceParent(self, parent: IServiceCollection) -> None: ...

    class Resource(resource.Resource):
        def __init__(self) -> None: ...

    class Request(server.Request):
        def __init__(self, channel: object, *args: object, **kwargs: object) -> None: ...
        def gotLength(self, length: int | None) -> None: ...
        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None: ...
        def handleContentChunk(self, data: bytes) -> None: ...
        def write(self, data: bytes) -> None: ...
        def finish(self) -> None: ...
        def connectionLost(self, reason: Failure) -> None: ...
        def getClientAddress(self) -> IAddress: ...
        def render(self, resrc: IResource) -> None: ...
        def processingFailed(self, reason: Failure) -> None: ...
        def _handleStar(self) -> None: ...

    class FileBodyProducer(client.FileBodyProducer):
        def __init__(self, inputFile: IO[bytes], cooperator: object = ..., readSize: int = ...) -> None: ...
        def startProducing(self, consumer: IConsumer) -> Deferred[None]: ...

    class Site(server.Site):
        def __init__(self, resource: IResource, *args: object, **kwargs: object) -> None: ...

    class Options(usage.Options):
        def __init__(self) -> None: ...
        def parseOptions(self, options: Sequence[str] | None = None) -> None: ...

    class SendMessage(Protocol):
        def __call__(
            self,
            payload: bytes,
            isBinary: bool = False,
            fragmentSize: int | None = None,
            sync: bool = False,
            doNotCompress: bool = False,
        ) -> None: ...

    class WebSocketServerProtocol(websocket.WebSocketServerProtocol):
        sendMessage: SendMessage

        def makeConnection(self, transport: ITransport) -> None: ...

    class WebSocketClientProtocol(websocket.WebSocketClientProtocol):
        sendMessage: SendMessage

        def processHandshake(self) -> None: ...

    class WebSocketServerFactory(websocket.WebSocketServerFactory):
        def __init__(
            self,
            url: str | None = None,
            protocols: Sequence[str] | None = None,
            server: str | None = ...,
            headers: dict[str, str] | None = None,
            externalPort: int | None = None,
            *,
            reactor: object = None,  # the reactor its timers run on
        ) -> None: ...
        def setProtocolOptions(self, *args: object, **options: object) -> None: ...

    class WebSocketClientFactory(websocket.WebSocketClientFactory):
        def __init__(
            self,
            url: str | None = None,
            origin: str | None = None,
            protocols: Sequence[str] | None = None,
            useragent: str | None = ...,
            headers: dict[str, str] | None = None,
            proxy: dict[str, object] | None = None,
            *,
            reactor: object = None,  # the reactor its timers run on
        ) -> None: ...
        def setProtocolOptions(self, *args: object, **options: object) -> None: ...
        def setSessionParameters(
            self,
            url: str | None = None,
            origin: str | None = None,
            protocols: Sequence[str] | None = None,
            useragent: str | None = None,
            headers: dict[str, str] | None = None,
            proxy: dict[str, object] | None = None,
        ) -> None: ...

else:
    HTTPChannel = http.HTTPChannel
    Resource = resource.Resource
    Service = service.Service
    MultiService = service.MultiService
    Site = server.Site
    Request = server.Request
    FileBodyProducer = client.FileBodyProducer
    Options = usage.Options
    WrappingFactory = policies.WrappingFactory
    Int32StringReceiver = basic.Int32StringReceiver

    def __getattr__(name: str) -> type:
        """Autobahn's classes, imported when first asked for."""
        if name not in __all__:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from autobahn.twisted import websocket

        return getattr(websocket, name)
