// Real-browser test of the web PTT page: two Chromium pages join one channel, Alice holds the button,
// Bob's getStats() shows inbound audio packets rising and his page shows who speaks.
// Run by run.sh (which starts the server); usage: node ptt.mjs http://127.0.0.1:PORT OUT_DIR
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import path from "node:path";

const base = process.argv[2] || "http://127.0.0.1:18080";
const outDir = process.argv[3] || "target/browser";
const wav = process.env.TALKGROUP_TEST_WAV || "";
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

const userDataDir = path.join(outDir, `profile-${process.pid}`);
const ctx = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args,
  permissions: ["microphone"],
  viewport: { width: 640, height: 720 },
});
const timeout = (ms, what) => new Promise((_, rej) => setTimeout(() => rej(new Error(`timeout: ${what}`)), ms));
const guard = setTimeout(() => { console.log("FAILED - the test did not finish in 60 s"); process.exit(1); }, 60_000);

try {
  const alice = await ctx.newPage();
  const bob = await ctx.newPage();
  for (const [page, name] of [[alice, "alice"], [bob, "bob"]]) {
    page.on("console", (m) => console.log(`[${name}] ${m.text()}`));
    page.on("pageerror", (e) => console.log(`[${name}] page error: ${e.message}`));
    await page.goto(base + "/");
    await page.fill("#channel", "web-ptt");
    await page.fill("#member", name);
    await page.click("#join");
    await page.waitForFunction(() => window.tg.joined && window.tg.pc && window.tg.pc.connectionState === "connected",
      null, { timeout: 15_000 });
    check(true, `${name} joined and connected (ICE + DTLS)`);
  }
  await bob.waitForFunction(() => window.tg.members.has("alice"), null, { timeout: 5000 });
  check(true, "bob's member list shows alice");

  const inbound = (page) => page.evaluate(async () => {
    let n = 0;
    (await window.tg.pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "audio") n += r.packetsReceived; });
    return n;
  });
  const before = await inbound(bob);

  // Alice holds the button with the mouse for 3 s.
  const box = await alice.locator("#talk").boundingBox();
  await alice.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await alice.mouse.down();
  await alice.waitForFunction(() => window.tg.talking, null, { timeout: 5000 });
  check(true, "alice was granted the floor and is talking");
  await bob.waitForFunction(() => document.querySelector("#speaker").textContent.includes("alice is talking"),
    null, { timeout: 5000 });
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
  await bob.screenshot({ path: path.join(outDir, "ptt.png") });
  await alice.screenshot({ path: path.join(outDir, "ptt-speaker.png") });

  await alice.mouse.up();
  await bob.waitForFunction(() => document.querySelector("#speaker").textContent.includes("Nobody"), null, { timeout: 5000 });
  check(true, "after release bob's page shows nobody talking");
  const quiet1 = await inbound(bob);
  await bob.waitForTimeout(1000);
  const quiet2 = await inbound(bob);
  check(quiet2 - quiet1 <= 2, `no audio after the release (${quiet2 - quiet1} packets in 1 s)`);

  // Bob talks with the space bar; Alice's page shows it.
  await bob.locator("#talk").focus();
  await bob.keyboard.down("Space");
  await alice.waitForFunction(() => document.querySelector("#speaker").textContent.includes("bob is talking"),
    null, { timeout: 5000 });
  check(true, "space bar: alice's page shows 'bob is talking'");
  await bob.keyboard.up("Space");
  await alice.waitForFunction(() => document.querySelector("#speaker").textContent.includes("Nobody"), null, { timeout: 5000 });
  check(true, "space bar released: the floor is free again");
} catch (e) {
  check(false, e.message);
} finally {
  clearTimeout(guard);
  await Promise.race([ctx.close(), timeout(5000, "close")]).catch(() => {});
}
console.log(`browser: ${passes} passed, ${failures} failed`);
process.exit(failures === 0 ? 0 : 1);
