// The Tally console: only the /v1 API, the token in memory (never in a
// cookie or in storage), and every figure and string from the server put on
// the page as text (textContent), never as markup: memos and names are
// user input.

let token = null;
let role = null;
let historyNext = null;
let pending = null; // {id, what}
let chartTimer = null;

const $ = (id) => document.getElementById(id);

// Integers are exact over the whole i64 range: beyond 2^53 JSON numbers are
// read as BigInt (from their source text) and written back as raw JSON.
function parse(text) {
  return JSON.parse(text, (key, value, context) => {
    if (typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)) {
      return BigInt(context.source);
    }
    return value;
  });
}

function stringify(value, space) {
  return JSON.stringify(value, (key, v) => (typeof v === "bigint" ? JSON.rawJSON(v.toString()) : v), space);
}

class ApiError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

async function call(op, args = {}) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  const response = await fetch(`/v1/${op}`, { method: "POST", headers, body: stringify(args) });
  const body = parse(await response.text());
  if (!response.ok) throw new ApiError(body.code, body.message);
  return body;
}

function say(text, error = false) {
  const s = $("status");
  s.textContent = text;
  s.className = error ? "error" : "";
}

function cell(value, numeric = false) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "" : String(value);
  if (numeric) td.className = "num";
  return td;
}

function when(ms) {
  return ms ? new Date(Number(ms)).toLocaleString() : "";
}

// The form's named fields: integers where `ints` says so, empty ones left out.
function fields(form, ints = []) {
  const out = {};
  for (const [name, raw] of new FormData(form)) {
    const value = String(raw).trim();
    if (value === "") continue;
    if (ints.includes(name)) {
      if (!/^-?\d+$/.test(value)) throw new ApiError("bad_request", `${name} must be a whole number`);
      const n = BigInt(value);
      out[name] = Number.isSafeInteger(Number(n)) ? Number(n) : n;
    } else {
      out[name] = value;
    }
  }
  return out;
}

// Runs a form's action, reporting its outcome in the status line.
function onSubmit(id, action) {
  $(id).addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await action(event.target);
    } catch (e) {
      say(e.code ? `${e.code}: ${e.message}` : String(e), true);
    }
  });
}

// --- logging in and out ---------------------------------------------------

onSubmit("login-form", async (form) => {
  const r = await call("login", fields(form));
  token = r.token;
  role = r.role;
  form.reset();
  $("who").textContent = `${r.user} (${r.role})`;
  $("login-view").hidden = true;
  $("logout").hidden = false;
  say(`Logged in as ${r.user}.`);
  if (role === "user") {
    $("user-view").hidden = false;
    await refreshUser();
  } else {
    $("staff-view").hidden = false;
    await refreshRedeems();
    startChart();
  }
});

$("logout").addEventListener("click", async () => {
  try {
    await call("logout");
  } catch (e) {
    // The token is dropped either way.
  }
  token = null;
  role = null;
  clearInterval(chartTimer);
  for (const id of ["user-view", "staff-view", "code-form", "logout"]) $(id).hidden = true;
  $("login-view").hidden = false;
  $("who").textContent = "";
  for (const t of document.querySelectorAll("tbody")) t.replaceChildren();
  say("Logged out.");
});

// --- a user's own account -------------------------------------------------

async function refreshUser() {
  const b = await call("balance");
  $("balance").textContent = String(b.balance);
  $("held").textContent = String(b.held);
  $("available").textContent = String(b.available);
  $("history").tBodies[0].replaceChildren();
  historyNext = null;
  await loadHistory();
  const mine = await call("my_redeems");
  $("my-redeems").tBodies[0].replaceChildren(
    ...mine.requests.map((r) => {
      const tr = document.createElement("tr");
      tr.append(cell(r.request), cell(r.item), cell(r.amount, true), cell(r.status), cell(r.note));
      return tr;
    }),
  );
}

async function loadHistory() {
  const args = { limit: 10 };
  if (historyNext !== null) args.after = historyNext;
  const page = await call("history", args);
  for (const t of page.transfers) {
    const tr = document.createElement("tr");
    tr.append(cell(t.id), cell(t.kind), cell(t.from), cell(t.to), cell(t.amount, true), cell(t.fee, true), cell(t.memo), cell(when(t.time)));
    $("history").tBodies[0].append(tr);
  }
  historyNext = page.next ?? null;
  $("history-more").hidden = historyNext === null;
}

$("history-more").addEventListener("click", () => loadHistory().catch((e) => say(`${e.code}: ${e.message}`, true)));

// An op's answer: done, or a session waiting for the mailed code.
async function started(result, what) {
  if (result && result.pending) {
    pending = { id: result.pending, what };
    $("code-what").textContent = `A code for this ${what} was sent to your mail.`;
    $("code-form").hidden = false;
    $("code-form").elements.otp.focus();
    say(`Enter the code to confirm the ${what}.`);
    return;
  }
  say(`The ${what} is done.`);
  await refreshUser();
}

onSubmit("transfer-form", async (form) => {
  const r = await call("transfer", fields(form, ["amount"]));
  form.reset();
  await started(r, "transfer");
});

onSubmit("redeem-form", async (form) => {
  const r = await call("redeem", fields(form, ["amount"]));
  form.reset();
  await started(r, "redeem request");
});

onSubmit("code-form", async (form) => {
  const { otp } = fields(form);
  try {
    await call("confirm", { pending: pending.id, otp });
  } catch (e) {
    if (e.code !== "otp_invalid") {
      form.hidden = true;
      pending = null;
    }
    throw e;
  }
  form.reset();
  form.hidden = true;
  say(`The ${pending.what} is confirmed.`);
  pending = null;
  await refreshUser();
});

// --- staff ----------------------------------------------------------------

onSubmit("search-form", async (form) => {
  const page = await call("list_accounts", { ...fields(form, ["balance_min", "balance_max"]), limit: 100 });
  $("accounts").tBodies[0].replaceChildren(
    ...page.accounts.map((a) => {
      const tr = document.createElement("tr");
      tr.append(cell(a.account), cell(a.owner), cell(a.tags.join(", ")), cell(a.balance, true), cell(a.memo));
      return tr;
    }),
  );
  say(`${page.accounts.length} accounts${page.next ? " (more: narrow the search)" : ""}.`);
});

onSubmit("mint-form", async (form) => {
  const t = await call("mint", fields(form, ["amount"]));
  form.reset();
  say(`Minted ${t.amount} to ${t.to} (record ${t.id}).`);
});

onSubmit("events-form", async (form) => {
  const u = await call("set_events", fields(form, ["events"]));
  form.reset();
  say(`${u.user} has ${u.events} events.`);
});

async function refreshRedeems() {
  const page = await call("redeems", { status: "pending" });
  $("redeems").tBodies[0].replaceChildren(
    ...page.requests.map((r) => {
      const tr = document.createElement("tr");
      const actions = document.createElement("td");
      for (const [label, accept] of [["Accept", true], ["Reject", false]]) {
        const b = document.createElement("button");
        b.textContent = label;
        if (!accept) b.className = "reject";
        b.addEventListener("click", async () => {
          try {
            const d = await call("decide_redeem", { request: r.request, accept });
            say(`Request ${d.request} is ${d.status}.`);
            await refreshRedeems();
          } catch (e) {
            say(`${e.code}: ${e.message}`, true);
          }
        });
        actions.append(b, " ");
      }
      tr.append(cell(r.request), cell(r.user), cell(r.item), cell(r.amount, true), cell(r.memo), actions);
      return tr;
    }),
  );
}

$("audit-run").addEventListener("click", async () => {
  try {
    $("audit").textContent = stringify(await call("audit"), 2);
  } catch (e) {
    say(`${e.code}: ${e.message}`, true);
  }
});

// The live chart: transfers/s from /metrics, once a second, the last minute.
function startChart() {
  const points = [];
  let last = null;
  const tick = async () => {
    try {
      const r = await fetch("/metrics", { headers: { authorization: `Bearer ${token}` } });
      if (!r.ok) return;
      const line = (await r.text()).split("\n").find((l) => l.startsWith("tally_transfers_total "));
      const total = Number(line.split(" ")[1]);
      const now = performance.now();
      if (last) {
        const rate = ((total - last.total) * 1000) / (now - last.now);
        points.push(rate);
        if (points.length > 60) points.shift();
        $("rate").textContent = String(Math.round(rate));
        draw(points);
      }
      last = { total, now };
    } catch (e) {
      // The next tick tries again.
    }
  };
  tick();
  chartTimer = setInterval(tick, 1000);
}

function draw(points) {
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  const top = Math.max(1, ...points);
  g.strokeStyle = "#2b6cb0";
  g.lineWidth = 2;
  g.beginPath();
  points.forEach((p, i) => {
    const x = (i / 59) * canvas.width;
    const y = canvas.height - 4 - (p / top) * (canvas.height - 8);
    if (i === 0) g.moveTo(x, y);
    else g.lineTo(x, y);
  });
  g.stroke();
}
