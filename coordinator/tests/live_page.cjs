// Drives the coordinator's live page in headless Chromium (playwright-core, Debian's chromium)
// against a real run: no console errors, the fixed-noise grid is there and changes after an
// epoch, and every chart has one point per step once the run is complete.
// Usage: node live_page.cjs URL SCREENSHOT.png GRIDS   (GRIDS: thumbnails the finished run shows;
// CHROMIUM: the browser, default /usr/bin/chromium)
"use strict";
const { chromium } = require("playwright-core");

async function main() {
  const [url, screenshot, grids] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  const problems = [];
  const result = { grids: [], problems };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
    page.on("console", m => { if (m.type() === "error" || m.type() === "warning") problems.push(`console ${m.type()}: ${m.text()}`); });
    page.on("pageerror", e => problems.push(`page error: ${e.message}`));
    page.on("requestfailed", r => problems.push(`request failed: ${r.url()} ${r.failure() && r.failure().errorText}`));
    page.on("response", r => { if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.url()}`); });
    await page.goto(url, { waitUntil: "load" });

    // The first fixed-noise grid, loaded as an image (not a broken one).
    await page.waitForSelector("#latest-grid[data-grid]", { timeout: 180000 });
    const first = await page.getAttribute("#latest-grid", "data-grid");
    result.grids.push(first);
    // Mid-run: the charts hold every step the page has fetched.
    result.mid = await page.evaluate(() => ({
      steps: Number(document.body.dataset.steps),
      state: document.body.dataset.state,
      points: [...document.querySelectorAll("polyline[data-series='loss_D']")].map(p => Number(p.dataset.points)),
    }));
    // The grid changes after the next epoch.
    await page.waitForFunction(g => document.querySelector("#latest-grid").dataset.grid !== g, first, { timeout: 180000 });
    result.grids.push(await page.getAttribute("#latest-grid", "data-grid"));
    await page.waitForFunction(() => {
      const img = document.querySelector("#latest-grid");
      return img.complete && img.naturalWidth > 0;
    }, null, { timeout: 30000 });
    result.grid_size = await page.evaluate(() => {
      const img = document.querySelector("#latest-grid");
      return [img.naturalWidth, img.naturalHeight];
    });

    // The end: every series has one point per step.
    await page.waitForFunction(() => document.body.dataset.state === "COMPLETED", null, { timeout: 300000 });
    // The last epoch's grid is drawn from the final checkpoint after the workers finish, so it
    // may reach the page a refresh after COMPLETED does.
    await page.waitForFunction(n => document.querySelectorAll("#grids img").length >= n, Number(grids), { timeout: 30000 })
      .catch(() => {});
    result.end = await page.evaluate(() => ({
      steps: Number(document.body.dataset.steps),
      shown_step: Number(document.querySelector("#step").textContent),
      total: Number(document.querySelector("#total-steps").textContent),
      series: Object.fromEntries([...document.querySelectorAll("polyline[data-series]")].map(p => [p.dataset.series, Number(p.dataset.points)])),
      workers: document.querySelectorAll("#workers tbody tr").length,
      checkpoint_links: [...document.querySelectorAll("#checkpoints a")].map(a => a.getAttribute("href")),
      thumbnails: document.querySelectorAll("#grids img").length,
      shown_epoch: document.querySelector("#epoch").textContent,
      epochs: document.querySelector("#epochs").textContent,
      latest_grid: document.querySelector("#latest-grid").dataset.grid,
      latest_label: document.querySelector("#latest-grid-label").textContent,
      real: (img => [img.complete && img.naturalWidth > 0, img.getAttribute("src")])(document.querySelector("#real-grid")),
      // Both grids stay inside their column, whatever their pixel size.
      grids_fit: ["#latest-grid", "#real-grid"].every(sel => {
        const img = document.querySelector(sel);
        return img.getBoundingClientRect().right <= img.closest("section").getBoundingClientRect().right + 1;
      }),
    }));
    if (screenshot) { await page.screenshot({ path: screenshot, fullPage: true }); }
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch(e => { console.error(e.stack || String(e)); process.exit(1); });
