"""A minimal mautrix-python appservice for roster's ingestion benchmark.

It is what `mautrix.appservice.AppService` gives with its defaults (its file state store in
the working directory, asynchronous event handlers) plus one handler that counts the
m.room.member events it receives. `GET /count` answers that count.

Run by benches/ingest.rs, never by hand: the tokens come from the environment
(HS_TOKEN, AS_TOKEN), the port from the command line.
"""

import asyncio
import os
import sys

from aiohttp import web
from mautrix.appservice import AppService
from mautrix.types import EventType


def main() -> None:
    port = int(sys.argv[1])
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    appservice = AppService(
        server="http://127.0.0.1:9",  # never called: the benchmark only pushes to it
        domain="roster.test",
        as_token=os.environ["AS_TOKEN"],
        hs_token=os.environ["HS_TOKEN"],
        bot_localpart="counter",
        id="counter",
        loop=loop,
    )
    members = 0

    @appservice.matrix_event_handler
    async def count(event) -> None:
        nonlocal members
        if event.type == EventType.ROOM_MEMBER:
            members += 1

    async def answer_count(_request: web.Request) -> web.Response:
        return web.json_response({"count": members})

    appservice.app.router.add_get("/count", answer_count)
    loop.run_until_complete(appservice.start(host="127.0.0.1", port=port))
    loop.run_forever()


if __name__ == "__main__":
    main()
