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
