// Real-browser test of the web PTT page against a server that checks tokens and records bursts:
// - alice opens the page with `#token=…` (read, then removed from the address bar); her token does not
//   allow channel ops-2, which the page says in plain words; she and bob (the dispatcher, admin token
//   typed into the field) join web-ptt over WebRTC;
// - alice holds the button: bob's getStats() shows inbound audio rising and his page shows who speaks;
// - bob's history lists the burst with a recording he plays (fetched with his bearer token);
// - alice's emergency call shows the red banner on bob's page, cleared when it ends;
// - alice's WebSocket is cut (TCP resets through a proxy, no close frame): her page reconnects and resumes,
//   keeps its peer connection, and bob never sees her leave; both can still talk;
// - redirect and goaway, which this server does not send yet: Playwright plays the node that sends them
//   between carol's page and the real server (routeWebSocket), and her page follows them.
// Run by run.sh (which starts the server and mints the tokens);
// usage: TG_TOKEN_ALICE=… TG_TOKEN_BOB=… TG_TOKEN_CAROL=… node ptt.mjs http://127.0.0.1:PORT OUT_DIR
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import net from "node:net";
import path from "node:path";

const base = process.argv[2] || "http://127.0.0.1:18080";
const outDir = process.argv[3] || "target/browser";
const wav = process.env.TALKGROUP_TEST_WAV || "";
const tokens = { alice: process.env.TG_TOKEN_ALICE, bob: process.env.TG_TOKEN_BOB, carol: process.env.TG_TOKEN_CAROL };
if (!tokens.alice || !tokens.bob || !tokens.carol) {
  console.log("FAILED - TG_TOKEN_ALICE, TG_TOKEN_BOB and TG_TOKEN_CAROL are needed (run.sh mints them)");
  process.exit(1);
}
mkdirSync(outDir, { recursive: true });

const args = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required",
  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
];
if (wav) args.push(`--use-file-for-fake-audio-capture=${wav}`);

let failures = 0, passes = 0;
function check(ok, what) {
  console.log(`${ok ? "ok" : "FAILED"} - ${what}`);
  if (ok) passes++; else failures++;
}

// A TCP proxy in front of the server for alice's page, a toxic in toxiproxy's sense: `cut(ms)` resets every
// connection through it (reset_peer: no WebSocket close frame reaches either side) and refuses new ones
// for `ms` — a network blip.
async function blipProxy(target) {
  const live = new Set();
  let down = false;
  const server = net.createServer((client) => {
    if (down) { client.resetAndDestroy(); return; }
    const upstream = net.connect(target.port, target.hostname);
    const pair = [client, upstream];
    live.add(pair);
    const end = () => { live.delete(pair); client.destroy(); upstream.destroy(); };
    for (const s of pair) { s.on("error", end); s.on("close", end); }
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut(ms) {
      down = true;
      for (const pair of live) for (const s of pair) s.resetAndDestroy();
      live.clear();
      setTimeout(() => { down = false; }, ms);
    },
    close() { for (const pair of live) for (const s of pair) s.destroy(); server.close(); },
  };
}

const userDataDir = path.join(outDir, `profile-${process.pid}`);
const ctx = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args,
  permissions: ["microphone"],
  viewport: { width: 660, height: 1100 },
});
const timeout = (ms, what) => new Promise((_, rej) => setTimeout(() => rej(new Error(`timeout: ${what}`)), ms));
const guard = setTimeout(() => { console.log("FAILED - the test did not finish in 60 s"); process.exit(1); }, 60_000);
const proxy = await blipProxy(new URL(base));
const text = (page, sel) => page.locator(sel).textContent();
const waitText = (page, sel, part, ms = 5000) => page.waitForFunction(([s, p]) =>
  (document.querySelector(s)?.textContent || "").includes(p), [sel, part], { timeout: ms });
const joinedAndConnected = (page) => page.waitForFunction(
  () => window.tg.joined && window.tg.pc && window.tg.pc.connectionState === "connected", null, { timeout: 15_000 });
const inbound = (page) => page.evaluate(async () => {
  let n = 0;
  (await window.tg.pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "audio") n += r.packetsReceived; });
  return n;
});
async function holdMouse(page, sel) {
  const box = await page.locator(sel).boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.down();
}

try {
  const alice = await ctx.newPage();
  const bob = await ctx.newPage();
  for (const [page, name] of [[alice, "alice"], [bob, "bob"]]) {
    page.on("console", (m) => console.log(`[${name}] ${m.text()}`));
    page.on("pageerror", (e) => check(false, `[${name}] page error: ${e.message}`));
  }

  // Tokens: alice's from the URL fragment (through the blip proxy), bob's typed into the field.
  await alice.goto(`${proxy.url}/#token=${tokens.alice}`);
  const fromFragment = await alice.evaluate(() => ({ hash: location.hash, href: location.href,
    token: document.querySelector("#token").value, name: document.querySelector("#member").value,
    readOnly: document.querySelector("#member").readOnly }));
  check(fromFragment.token === tokens.alice && fromFragment.hash === "" && !fromFragment.href.includes("token"),
    "the page read the token from #token=… and removed it from the address bar");
  check(fromFragment.name === "alice" && fromFragment.readOnly, "the name comes from the token (alice, read-only)");
  await waitText(alice, "#authinfo", "checks tokens");
  check(true, "hello.auth shown: the page says the server checks tokens");

  await alice.fill("#channel", "ops-2");
  await alice.click("#join");
  await waitText(alice, "#error", "This token does not allow channel ops-2");
  check(true, `unauthorized in plain words: "${await text(alice, "#error")}" / ${await text(alice, "#errordetail")}`);

  await alice.fill("#channel", "web-ptt");
  await alice.click("#join");
  await joinedAndConnected(alice);
  check(true, "alice joined web-ptt with her token and connected (ICE + DTLS)");

  await bob.goto(base + "/");
  await bob.fill("#channel", "web-ptt");
  await bob.fill("#token", tokens.bob);
  check(await bob.inputValue("#member") === "bob", "bob's name comes from the token typed into the field");
  await bob.click("#join");
  await joinedAndConnected(bob);
  check(true, "bob joined and connected");
  await bob.waitForFunction(() => window.tg.members.has("alice"), null, { timeout: 5000 });
  check(true, "bob's member list shows alice");
  await waitText(alice, "#historystatus", "your token does not have the admin right");
  check(true, "alice (no admin right) is told the history is for dispatchers");

  // Alice holds the button with the mouse for 3 s.
  const before = await inbound(bob);
  await holdMouse(alice, "#talk");
  await alice.waitForFunction(() => window.tg.talking, null, { timeout: 5000 });
  check(true, "alice was granted the floor and is talking");
  await waitText(bob, "#speaker", "alice is talking");
  check(true, "bob's page shows 'alice is talking'");
  await alice.waitForTimeout(1500);
  const mid = await inbound(bob);
  await alice.waitForTimeout(1500);
  const after = await inbound(bob);
  console.log(`bob inbound audio packets: before ${before}, after 1.5 s ${mid}, after 3 s ${after}`);
  check(mid > before + 20 && after > mid + 20, "bob's inbound audio packets rise while alice talks");
  const samples = await bob.evaluate(async () => {
    let s = 0;
    (await window.tg.pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "audio") s += r.totalSamplesReceived || 0; });
    return s;
  });
  check(samples > 0, `bob decoded audio (${samples} samples)`);
  const energy = await bob.evaluate(async () => {
    let e = 0;
    (await window.tg.pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "audio") e += r.totalAudioEnergy || 0; });
    return e;
  });
  check(energy > 1e-4, `bob's audio is alice's speech, not silence (total audio energy ${energy.toFixed(4)})`);
  await alice.screenshot({ path: path.join(outDir, "ptt-speaker.png") });
  await alice.mouse.up();
  await waitText(bob, "#speaker", "Nobody");
  check(true, "after release bob's page shows nobody talking");
  const quiet1 = await inbound(bob);
  await bob.waitForTimeout(1000);
  const quiet2 = await inbound(bob);
  check(quiet2 - quiet1 <= 2, `no audio after the release (${quiet2 - quiet1} packets in 1 s)`);

  // The dispatcher's history: refreshed on idle, with the recording playable from a blob URL.
  const row = bob.locator("#history tbody tr", { hasText: "alice" }).first();
  await row.locator("button", { hasText: "Play" }).waitFor({ timeout: 5000 });
  check(true, `bob's history lists alice's burst with a recording: "${(await row.innerText()).replace(/\s+/g, " ")}"`);
  await row.locator("button", { hasText: "Play" }).click();
  await bob.waitForFunction(() => {
    const a = document.querySelector("#playback");
    return a.src.startsWith("blob:") && !a.paused && a.currentTime > 0.3;
  }, null, { timeout: 8000 });
  check(true, "the recording plays in bob's page (fetched with his bearer token, from a blob URL)");
  const rec = await bob.evaluate(async () => {
    const buf = await (await fetch(document.querySelector("#playback").src)).arrayBuffer();
    const audio = await new OfflineAudioContext(1, 48000, 48000).decodeAudioData(buf);
    const x = audio.getChannelData(0);
    let sum = 0;
    for (const v of x) sum += v * v;
    return { seconds: audio.duration, rms: Math.sqrt(sum / x.length) };
  });
  check(rec.seconds > 2 && rec.rms > 0.001,
    `the recording decodes: ${rec.seconds.toFixed(2)} s of audio, RMS ${rec.rms.toFixed(4)}`);
  const plain = await bob.evaluate(async () => (await fetch("/api/channels/web-ptt/history")).status);
  check(plain === 401, `without the bearer token the history route answers ${plain} (the page sends it)`);

  // Emergency: alice's call shows the banner on bob's page until its idle.
  await bob.evaluate(() => document.querySelector("#playback").pause());
  await holdMouse(alice, "#emergency");
  await waitText(bob, "#banner", "EMERGENCY — alice is talking");
  check(true, `emergency: bob's page shows the banner "${await text(bob, "#banner")}"`);
  await waitText(alice, "#banner", "you are on an emergency call");
  check(true, "alice's own page shows her emergency call");
  await alice.waitForTimeout(700);
  await bob.screenshot({ path: path.join(outDir, "ptt.png") });
  await alice.mouse.up();
  await bob.waitForFunction(() => document.querySelector("#banner").textContent === "", null, { timeout: 5000 });
  check(true, "the banner is cleared on the emergency burst's idle");
  await bob.locator("#history tbody tr.emergency", { hasText: "alice" }).first().waitFor({ timeout: 5000 });
  check(true, "bob's history marks alice's emergency burst");

  // A network blip: alice's WebSocket is reset (no close frame) and her reconnects refused for 1 s.
  await alice.evaluate(() => { window.pcBefore = window.tg.pc; });
  const seenBefore = (await bob.evaluate(() => window.tg.presenceLog.length));
  proxy.cut(1000);
  await alice.waitForFunction(() => window.tg.resumes === 1, null, { timeout: 12_000 });
  const resumed = await alice.evaluate(() => ({ joined: window.tg.joined, samePc: window.pcBefore === window.tg.pc,
    pc: window.tg.pc.connectionState, status: document.querySelector("#status").textContent }));
  check(resumed.joined && resumed.samePc && resumed.pc === "connected",
    `alice's page reconnected and resumed, same peer connection (${resumed.pc}): "${resumed.status}"`);
  await bob.waitForTimeout(500);
  const seen = await bob.evaluate((n) => ({ log: window.tg.presenceLog.slice(n), alice: window.tg.members.has("alice") }), seenBefore);
  check(seen.alice && seen.log.length === 0, `bob saw no left/joined for alice (${JSON.stringify(seen.log)})`);

  // After the resume: alice's press goes over the new socket and bob hears her.
  const r0 = await inbound(bob);
  await holdMouse(alice, "#talk");
  await waitText(bob, "#speaker", "alice is talking");
  await alice.waitForTimeout(1000);
  const r1 = await inbound(bob);
  check(r1 > r0 + 20, `after the resume alice talks and bob hears her (${r1 - r0} packets in 1 s)`);
  await alice.mouse.up();
  await waitText(alice, "#speaker", "Nobody");

  // Bob talks with the space bar; Alice's page (on its new socket) shows it.
  await bob.locator("#talk").focus();
  await bob.keyboard.down("Space");
  await waitText(alice, "#speaker", "bob is talking");
  check(true, "space bar: alice's page shows 'bob is talking'");
  await bob.keyboard.up("Space");
  await waitText(alice, "#speaker", "Nobody");
  check(true, "space bar released: the floor is free again");

  // Redirect and goaway, played by the test between carol's page and the server: at "node A" (/ws) a join
  // is answered `redirect` to "node B" (/ws?node=b, the same server), where it is forwarded.
  const carol = await ctx.newPage();
  carol.on("console", (m) => console.log(`[carol] ${m.text()}`));
  carol.on("pageerror", (e) => check(false, `[carol] page error: ${e.message}`));
  const links = [];
  await carol.routeWebSocket((u) => u.pathname === "/ws", (ws) => {
    const link = { ws, nodeB: new URL(ws.url()).searchParams.get("node") === "b", at: Date.now(), joins: 0 };
    link.server = ws.connectToServer();
    links.push(link);
    ws.onMessage((frame) => {
      const m = JSON.parse(String(frame));
      if (m.type === "join" && !link.nodeB) {
        ws.send(JSON.stringify({ type: "redirect", channel: m.channel, url: `${base.replace(/^http/, "ws")}/ws?node=b`, id: m.id }));
        return;
      }
      if (m.type === "join") link.joins++;
      link.server.send(frame);
    });
  });
  await carol.goto(`${base}/#token=${tokens.carol}&channel=web-ptt`);
  await carol.click("#join");
  await joinedAndConnected(carol);
  check(!links[0].nodeB && links.some((l) => l.nodeB && l.joins === 1),
    "redirect: carol's join answered `redirect` at node A was made again at the given URL, and she is in");
  await bob.waitForFunction(() => window.tg.members.has("carol"), null, { timeout: 5000 });

  // goaway: "node B" says it drains and closes (a goodbye: the server ends the session).
  const seenCarol = await bob.evaluate(() => window.tg.presenceLog.length);
  const drained = links.at(-1), count = links.length, t0 = Date.now();
  await carol.evaluate(() => { window.pcBefore = window.tg.pc; });
  drained.ws.send(JSON.stringify({ type: "goaway", reason: "draining", retry_after_ms: 800 }));
  await drained.server.close();
  await waitText(carol, "#status", "going away", 2000);
  check(true, `goaway: carol's page says "${await text(carol, "#status")}"`);
  await carol.waitForFunction(() => window.tg.joined && window.tg.pc !== window.pcBefore
    && window.tg.pc.connectionState === "connected", null, { timeout: 15_000 });
  const next = links[count];
  check(next && next.at - t0 >= 750 && links.slice(count).some((l) => l.nodeB && l.joins === 1),
    `goaway: carol came back after retry_after_ms (${next ? next.at - t0 : "?"} ms), could not resume the ended session, joined afresh (redirected again)`);
  const carolLog = await bob.evaluate((n) => window.tg.presenceLog.slice(n), seenCarol);
  check(carolLog.join() === "left:carol,joined:carol", `bob saw carol leave the drained node and join again (${carolLog})`);
} catch (e) {
  check(false, e.message);
} finally {
  clearTimeout(guard);
  proxy.close();
  await Promise.race([ctx.close(), timeout(5000, "close")]).catch(() => {});
}
console.log(`browser: ${passes} passed, ${failures} failed`);
process.exit(failures === 0 ? 0 : 1);
