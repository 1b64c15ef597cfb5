"""A FastAPI app as chat services write them: a trailing-slash redirect, Host, an echo WebSocket."""

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect

app = FastAPI()


@app.get("/ws1/echo/")
async def echo_page(request: Request) -> dict:
    return {"host": request.headers.get("host"), "url": str(request.url)}


@app.websocket("/ws1/echo/")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


#: bytes the upload in progress has read so far (one upload at a time in the tests)
progress = {"received": 0}


@app.post("/ws1/upload/")
async def upload(request: Request) -> dict:
    """Reads the body as it arrives, so another request can see how far it got."""
    progress["received"] = 0
    async for chunk in request.stream():
        progress["received"] += len(chunk)
    return {"received": progress["received"]}


@app.get("/ws1/progress/")
async def upload_progress() -> dict:
    return progress
