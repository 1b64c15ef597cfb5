// Drives demo chat pages in headless Chromium (playwright-core) for
// tests/browser/test_demo_page.py: one command per stdin line, one JSON answer
// per stdout line. Waits are bounded only against a hang.
import { createRequire } from 'node:module';
import readline from 'node:readline';

const require = createRequire(`${process.env.WSGATEWAY_TOOLS}/`);
const { chromium } = require('playwright-core');

const GUARD_MS = 30000;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ['--no-sandbox', '--disable-gpu'],
});
const pages = new Map();

async function view(page) {
  return page.evaluate(() => ({
    state: document.getElementById('state').dataset.state,
    members: document.getElementById('members').textContent,
    expired: document.getElementById('expired').classList.contains('shown'),
    messages: [...document.querySelectorAll('#log li:not(.notice)')].map((li) => ({
      meta: li.querySelector('.meta').textContent,
      text: li.lastChild.textContent,
      mine: li.classList.contains('mine'),
    })),
    notices: [...document.querySelectorAll('#log li.notice')].map((li) => li.textContent),
  }));
}

const commands = {
  async open(name, url) {
    const context = await browser.newContext({ viewport: { width: 390, height: 700 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => process.stderr.write(`${name}: ${e}\n`));
    await page.goto(url);
    pages.set(name, page);
    return {};
  },
  async wait_state(name, state) {
    const page = pages.get(name);
    const started = Date.now();
    await page.waitForFunction((s) => document.getElementById('state').dataset.state === s, state, { timeout: GUARD_MS });
    return { ms: Date.now() - started };
  },
  async wait_text(name, ...words) {
    const text = words.join(' ');
    await pages.get(name).waitForFunction(
      (t) => [...document.querySelectorAll('#log li')].some((li) => li.lastChild.textContent === t),
      text, { timeout: GUARD_MS },
    );
    return view(pages.get(name));
  },
  async wait_members(name, count) {
    await pages.get(name).waitForFunction(
      (c) => document.getElementById('members').textContent.startsWith(`${c} `), Number(count), { timeout: GUARD_MS },
    );
    return {};
  },
  async send(name, ...words) {
    const page = pages.get(name);
    await page.fill('#text', words.join(' '));
    await page.press('#text', 'Enter');
    return {};
  },
  async token(name, token) {
    const page = pages.get(name);
    await page.waitForSelector('#expired.shown', { timeout: GUARD_MS });
    await page.fill('#token', token);
    await page.click('#expired button');
    return {};
  },
  async view(name) {
    return view(pages.get(name));
  },
  async screenshot(name, path) {
    await pages.get(name).screenshot({ path });
    return {};
  },
};

const lines = readline.createInterface({ input: process.stdin });
console.log(JSON.stringify({ ready: true }));
for await (const line of lines) {
  const [command, ...args] = line.trim().split(' ');
  if (command === 'quit') break;
  try {
    console.log(JSON.stringify({ ok: true, ...(await commands[command](...args)) }));
  } catch (e) {
    console.log(JSON.stringify({ ok: false, error: String(e) }));
  }
}
await browser.close();
