// A minimal matrix-appservice-bridge appservice for roster's ingestion benchmark.
//
// BRIDGE_MODE=defaults: what `Bridge` gives with its defaults (NeDB room and user stores in
// the working directory, looked up for every event's context; the "single" event queue).
// BRIDGE_MODE=lean: no stores (so no context lookups) and no event queue, the fastest a
// membership counter can be built on it. Either way a controller counts the m.room.member
// events it receives and `GET /count` answers that count. Console logging is at `warn` so
// it does not print a line per request (roster and the mautrix peer log nothing per event
// either).
//
// Run by benches/ingest.rs, never by hand: the tokens come from the environment
// (HS_TOKEN, AS_TOKEN), the port from the command line.
"use strict";

const { Bridge, AppServiceRegistration, Logger } = require("matrix-appservice-bridge");

async function main() {
  const port = Number(process.argv[2]);
  Logger.configure({ console: "warn" });
  const registration = new AppServiceRegistration(null);
  registration.setId("counter");
  registration.setHomeserverToken(process.env.HS_TOKEN);
  registration.setAppServiceToken(process.env.AS_TOKEN);
  registration.setSenderLocalpart("counter");
  registration.addRegexPattern("users", "@counter_.*", true);
  let members = 0;
  const lean = process.env.BRIDGE_MODE === "lean";
  const bridge = new Bridge({
    ...(lean ? { disableStores: true, queue: { type: "none" } } : {}),
    homeserverUrl: "http://127.0.0.1:9", // never called: the benchmark only pushes to it
    domain: "roster.test",
    registration,
    controller: {
      onUserQuery: () => ({}),
      onEvent: (request) => {
        if (request.getData().type === "m.room.member") {
          members += 1;
        }
      },
    },
  });
  await bridge.run(port, undefined, "127.0.0.1");
  bridge.appService.expressApp.get("/count", (_req, res) => res.send({ count: members }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
