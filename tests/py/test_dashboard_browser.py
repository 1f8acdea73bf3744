"""The admin dashboard in a real browser: Debian's Chromium driven by chromedriver
(Selenium), against a real ``roony dev`` (control plane + sidecar + Stripe emulator).

One journey, in order (each step depends on the previous one):
sign in → connect Stripe through the emulator's OAuth page → some purchases and charges →
create an agent (its key, shown once, works at the sidecar) → dry run a tighter budget →
edit the demo agent's policy, see the validation error, publish it (the sidecar enforces
it) → an agent's purchase above the approval threshold waits in the approvals queue →
approve it with a note → the agent gets its card (API and MCP) → deny another with a
note → the agent learns why (API and MCP) → the merchant's charge
joins the purchase's chain in transactions → CSV export → the other pages → disconnect
Stripe (purchases decline with stripe_account_disconnected) → sign out.

Screenshots of the main pages are written to ``$ROONY_SCREENSHOTS_DIR`` (the committed
ones in docs/screenshots come from ``ROONY_SCREENSHOTS_DIR=docs/screenshots``), else to a
temporary directory.
"""

import asyncio
import json
import os
import re
import socket
import subprocess
import time

import httpx2
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from conftest import STARTUP_TIMEOUT_S

AGENT_KEY = "roony_dev_browser_test_key_0123456789"
PASSWORD = "browser-test-password-123"
CHROMIUM = os.environ.get("ROONY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ROONY_CHROMEDRIVER", "/usr/bin/chromedriver")
CONTROL_LISTENING = re.compile(r"control plane listening on (http://[^\s\x1b]+)")
EMULATOR_LISTENING = re.compile(r"stripe emulator listening on (http://[^\s\x1b]+)")
SIDECAR_LISTENING = re.compile(r"sidecar listening on (http://[^\s\x1b]+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_line(proc, pattern, timeout=STARTUP_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(proc.output):
            m = pattern.search(line)
            if m:
                return m.group(1).rstrip("/")
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"roony dev did not print {pattern.pattern}. Output:\n" + "\n".join(proc.output))


def eventually(check, what, timeout=15.0, interval=0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what} (last error: {last!r})")


@pytest.fixture(scope="module")
def dev(spawn_module, tmp_path_factory):
    data = tmp_path_factory.mktemp("dashboard-dev")
    control = f"127.0.0.1:{free_port()}"
    proc, _ = spawn_module(
        [
            "dev",
            "--sidecar-listen",
            "127.0.0.1:0",
            "--emulator-listen",
            "127.0.0.1:0",
            "--control-plane-listen",
            control,
            "--data-dir",
            str(data),
            "--stripe-connect",
        ],
        env={
            "ROONY_DEV_AGENT_KEY": AGENT_KEY,
            "ROONY_DEV_ADMIN_PASSWORD": PASSWORD,
            "ROONY_RATE_LIMIT_PER_SECOND": "0",
            "NO_COLOR": "1",
        },
    )
    return {
        "control": wait_line(proc, CONTROL_LISTENING),
        "sidecar": wait_line(proc, SIDECAR_LISTENING),
        "emulator": wait_line(proc, EMULATOR_LISTENING),
        "proc": proc,
    }


def buy(sidecar, amount, name, url, description, category=None):
    body = {
        "amount": amount,
        "currency": "usd",
        "merchant": {"name": name, "url": url, "country": "US"},
        "description": description,
    }
    if category:
        body["merchant"]["category"] = category
    r = requests.post(f"{sidecar}/api/v1/purchase_intent", headers=agent_headers(), json=body, timeout=10)
    assert r.status_code < 500, r.text
    return r.json()


def seed_history(roony_bin, dev, account):
    """A little history for the overview: two purchases charged and captured through the
    emulator (real-time authorization at the control plane), one left open, one declined."""
    charged = []
    for amount, name, url in [
        (1_200, "Namecheap", "https://www.namecheap.com"),
        (2_500, "GitHub", "https://github.com"),
    ]:
        intent = buy(dev["sidecar"], amount, name, url, f"{name} subscription")
        assert intent["status"] == "approved", intent
        out = subprocess.run(
            [
                roony_bin, "simulate", "charge",
                "--card", intent["card"]["id"],
                "--amount", str(amount),
                "--merchant", name.upper(),
                "--merchant-country", "US",
                "--capture",
                "--stripe-base-url", dev["emulator"],
                "--stripe-account", account,
            ],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        charged.append(intent["id"])
    open_intent = buy(dev["sidecar"], 800, "Figma", "https://figma.com", "a design seat")
    assert open_intent["status"] == "approved", open_intent
    declined = buy(
        dev["sidecar"], 3_000, "Lucky Casino", "https://casino.example", "chips",
        category="betting_casino_gambling",
    )
    assert declined["status"] == "declined", declined
    return charged


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: install Debian's chromium and chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(3)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    target = os.environ.get("ROONY_SCREENSHOTS_DIR")
    path = target if target else str(tmp_path_factory.mktemp("screenshots"))
    os.makedirs(path, exist_ok=True)

    def take(driver, name):
        # The whole page, not just the window.
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, max(800, min(int(height) + 40, 2400)))
        driver.save_screenshot(os.path.join(path, f"{name}.png"))
        driver.set_window_size(1400, 1000)

    return take


def agent_headers():
    return {"Authorization": f"Bearer {AGENT_KEY}"}


def flash(driver):
    found = driver.find_elements(By.CSS_SELECTOR, "p.flash")
    return found[0].text if found else ""


def set_textarea(driver, element, text):
    driver.execute_script("arguments[0].value = arguments[1];", element, text)


def test_admin_journey(roony_bin, dev, browser, shots):
    base = dev["control"]
    sidecar = dev["sidecar"]
    d = browser

    # Sign in (an unauthenticated page redirects to the form and back).
    d.get(f"{base}/approvals")
    assert "/login" in d.current_url
    shots(d, "login")
    d.find_element(By.NAME, "email").send_keys("admin@roony.dev")
    d.find_element(By.NAME, "password").send_keys(PASSWORD)
    d.find_element(By.CSS_SELECTOR, "form[action='/login'] button[type=submit]").click()
    eventually(lambda: d.current_url.endswith("/approvals"), "the redirect after sign-in")
    cookie = d.get_cookie("roony_session")
    # Lax, not Strict: Stripe's OAuth redirect back to the callback is a cross-site
    # navigation, which must carry the session (the OAuth state is bound to it).
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Lax"

    # Stripe Connect through the emulator's OAuth page (dev runs with --stripe-connect:
    # until an account is connected, nothing can be issued).
    d.get(f"{base}/stripe")
    shots(d, "stripe-not-connected")
    d.find_element(By.ID, "connect-stripe").click()
    approve = eventually(
        lambda: d.find_element(By.ID, "approve"),
        "the emulator's authorize page",
    )
    shots(d, "stripe-oauth-emulator")
    # The consent page is on another site than the dashboard (as connect.stripe.com is):
    # the redirect back to /stripe/callback is a cross-site navigation.
    assert d.current_url.startswith("http://localhost:"), d.current_url
    assert base.startswith("http://127.0.0.1:"), base
    approve.click()
    eventually(lambda: "connected stripe account" in flash(d), "the connected account")
    table = d.find_element(By.ID, "stripe-connection")
    assert table.get_attribute("data-status") == "connected"
    account = re.search(r"acct_[A-Za-z0-9]+", table.text).group(0)
    shots(d, "stripe")

    # Purchases now get cards (issued through the control plane's relay on the connected
    # account); the merchant charges two of them.
    charged = eventually(
        lambda: seed_history(roony_bin, dev, account), "purchases once the bundle says connected", timeout=20
    )

    # Create an agent: its key is shown once and works at the sidecar (it reaches the
    # sidecar in the next bundle).
    d.get(f"{base}/agents")
    form = d.find_element(By.CSS_SELECTOR, "form[action='/agents']")
    form.find_element(By.NAME, "name").send_keys("browser agent")
    from selenium.webdriver.support.ui import Select
    project = Select(form.find_element(By.NAME, "project_id"))
    project.select_by_visible_text(next(o.text for o in project.options if o.text.startswith("demo")))
    set_textarea(
        d,
        form.find_element(By.NAME, "policy"),
        json.dumps({"currency": "USD", "max_per_transaction": 2_000}),
    )
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    key = eventually(
        lambda: d.find_element(By.ID, "new-agent-key").text.strip(), "the new agent's key"
    )
    key = re.search(r"roony_ak_[0-9a-f_]+", key).group(0)
    shots(d, "agent-created")
    eventually(
        lambda: requests.get(
            f"{sidecar}/api/v1/budget", headers={"Authorization": f"Bearer {key}"}, timeout=5
        ).status_code
        == 200,
        "the new agent's key to work at the sidecar",
    )
    d.get(f"{base}/agents")
    assert "browser agent" in d.page_source
    assert key not in d.page_source, "an agent key is shown only once"
    shots(d, "agents")

    # Edit the demo agent's policy: an invalid draft shows its error inline, nothing is
    # published; a valid one publishes a new revision.
    d.get(f"{base}/agents/agt_demo/policy")
    area = d.find_element(By.CSS_SELECTOR, "textarea[name=policy]")
    current = json.loads(area.get_attribute("value"))
    bad = dict(current, max_per_transaction=-5)
    set_textarea(d, area, json.dumps(bad, indent=2))
    d.find_element(By.ID, "publish").click()
    errors = eventually(lambda: d.find_element(By.ID, "policy-errors").text, "validation errors")
    assert "max_per_transaction" in errors
    shots(d, "policy-validation-error")
    # A dry run of a tighter daily budget over the last 30 days shows which of today's
    # purchases it would have declined; nothing is published.
    area = d.find_element(By.CSS_SELECTOR, "textarea[name=policy]")
    tight = dict(current, budgets=[{"period": "daily", "limit": 3_000}])
    set_textarea(d, area, json.dumps(tight, indent=2))
    d.find_element(By.ID, "dry-run").click()
    results = eventually(lambda: d.find_element(By.ID, "dry-run-results"), "the dry run's results")
    assert int(results.get_attribute("data-replayed")) >= 3
    changed = d.find_elements(By.CSS_SELECTOR, "[data-test=dry-run-change]")
    assert int(results.get_attribute("data-changed")) == len(changed) >= 1
    assert any(c.get_attribute("data-new") == "declined" for c in changed)
    shots(d, "policy-dry-run")
    d.get(f"{base}/agents/agt_demo/policy")
    assert d.find_element(By.ID, "current-revision").get_attribute("data-revision") == "1"

    area = d.find_element(By.CSS_SELECTOR, "textarea[name=policy]")
    good = dict(current, max_per_transaction=9_000)
    set_textarea(d, area, json.dumps(good, indent=2))
    d.find_element(By.ID, "publish").click()
    eventually(lambda: "published revision" in flash(d), "the publish confirmation")
    assert d.find_element(By.ID, "current-revision").get_attribute("data-revision") == "2"
    shots(d, "policy")

    # The demo agent's budgets as its sidecar enforces them: the policy's USD 250.00 a day,
    # with what today's purchases use of it. A looser agent budget is refused inline; a
    # tighter one can be dry-run first (nothing is saved).
    d.get(f"{base}/agents/agt_demo")
    row = d.find_element(By.CSS_SELECTOR, "#agent-budgets tr[data-source=policy][data-period=daily]")
    assert row.get_attribute("data-limit") == "25000"
    assert int(row.get_attribute("data-used")) > 0
    form = d.find_element(By.ID, "budget-form")
    assert form.find_element(By.NAME, "currency").get_attribute("value") == "USD"
    Select(form.find_element(By.NAME, "period")).select_by_value("daily")
    form.find_element(By.NAME, "amount").send_keys("500")
    form.find_element(By.ID, "budget-submit").click()
    error = eventually(
        lambda: d.find_element(By.CSS_SELECTOR, "[data-code=budget_looser_than_policy]"), "the looser budget refused"
    )
    assert "USD 250.00" in error.text
    form = d.find_element(By.ID, "budget-form")
    Select(form.find_element(By.NAME, "period")).select_by_value("daily")
    amount = form.find_element(By.NAME, "amount")
    amount.clear()
    amount.send_keys("20")
    form.find_element(By.ID, "budget-dry-run").click()
    results = eventually(lambda: d.find_element(By.ID, "dry-run-results"), "the budget dry run")
    assert int(results.get_attribute("data-replayed")) >= 3
    assert int(results.get_attribute("data-changed")) >= 1
    shots(d, "agent-budgets")
    d.get(f"{base}/budgets")
    assert d.find_elements(By.CSS_SELECTOR, "#agent-limits tr[data-scope-id=agt_demo]")
    shots(d, "budgets")

    # The sidecar enforces the published policy: USD 95 is now above the maximum.
    def declined_over_max():
        r = requests.post(
            f"{sidecar}/api/v1/purchase_intent",
            headers=agent_headers(),
            json={
                "amount": 9_500,
                "currency": "usd",
                "merchant": {"name": "Big Purchase Co", "url": "https://big.example", "country": "US"},
                "description": "over the new maximum",
            },
            timeout=5,
        )
        return r.json().get("status") == "declined" and "exceeds_transaction_limit" in json.dumps(r.json())

    eventually(declined_over_max, "the sidecar to enforce the published policy")

    # A purchase above the confirmation threshold waits for an administrator.
    r = requests.post(
        f"{sidecar}/api/v1/purchase_intent",
        headers=agent_headers(),
        json={
            "amount": 6_000,
            "currency": "usd",
            "merchant": {"name": "Acme, \"Cloud\" Hosting", "url": "https://acme-hosting.example", "country": "US"},
            "description": "a year of hosting",
        },
        timeout=5,
    )
    assert r.status_code in (200, 201, 202), r.text
    intent = r.json()
    assert intent["status"] == "pending_approval", intent
    intent_id = intent["id"]

    def queued():
        d.get(f"{base}/approvals")
        return intent_id in d.page_source

    eventually(queued, "the purchase in the approvals queue")
    shots(d, "approvals")
    row = d.find_element(By.ID, f"approval-{intent_id}")
    row.find_element(By.CSS_SELECTOR, "textarea[data-test=approval-note]").send_keys("ok for the hosting renewal")
    row.find_element(By.CSS_SELECTOR, "[data-test=approve]").click()
    eventually(lambda: "approved" in flash(d).lower(), "the approval confirmation")

    # The agent sees the outcome: its purchase is approved with a card.
    def agent_has_card():
        got = requests.get(
            f"{sidecar}/api/v1/purchase_intents/{intent_id}", headers=agent_headers(), timeout=5
        ).json()
        return got if got.get("status") == "approved" and got.get("card") else None

    got = eventually(agent_has_card, "the approved card at the agent")
    assert got["card"]["last4"]

    # … and so does an MCP client (the official SDK over streamable HTTP).
    async def mcp_get():
        http = httpx2.AsyncClient(headers=agent_headers(), timeout=30)
        async with Client(streamable_http_client(f"{sidecar}/mcp", http_client=http)) as c:
            return await c.call_tool("get_purchase", {"id": intent_id})

    via_mcp = asyncio.run(asyncio.wait_for(mcp_get(), timeout=60))
    assert not via_mcp.is_error, via_mcp.content
    assert via_mcp.structured_content["status"] == "approved"
    assert via_mcp.structured_content["card"]["last4"] == got["card"]["last4"]

    # Another purchase waits; the administrator denies it with a note, and the agent learns
    # why (API and MCP): declined, denied_by_admin, the note in the message.
    r = requests.post(
        f"{sidecar}/api/v1/purchase_intent",
        headers=agent_headers(),
        json={
            "amount": 7_000,
            "currency": "usd",
            "merchant": {"name": "Conference Tickets", "url": "https://conf.example", "country": "US"},
            "description": "two conference passes",
        },
        timeout=5,
    )
    denied_id = r.json()["id"]
    assert r.json()["status"] == "pending_approval", r.text

    def queued_denial():
        d.get(f"{base}/approvals")
        return denied_id in d.page_source

    eventually(queued_denial, "the second purchase in the approvals queue")
    row = d.find_element(By.ID, f"approval-{denied_id}")
    row.find_element(By.CSS_SELECTOR, "textarea[data-test=approval-note]").send_keys("not in this quarter's plan")
    row.find_element(By.CSS_SELECTOR, "[data-test=deny]").click()
    eventually(lambda: "denied" in flash(d).lower(), "the denial confirmation")

    def agent_sees_denial():
        got = requests.get(
            f"{sidecar}/api/v1/purchase_intents/{denied_id}", headers=agent_headers(), timeout=5
        ).json()
        return got if got.get("status") == "declined" else None

    denied = eventually(agent_sees_denial, "the denial at the agent")
    assert "denied_by_admin" in json.dumps(denied), denied
    assert "not in this quarter's plan" in json.dumps(denied), denied
    assert not denied.get("card"), denied

    async def mcp_get_denied():
        http = httpx2.AsyncClient(headers=agent_headers(), timeout=30)
        async with Client(streamable_http_client(f"{sidecar}/mcp", http_client=http)) as c:
            return await c.call_tool("get_purchase", {"id": denied_id})

    via_mcp = asyncio.run(asyncio.wait_for(mcp_get_denied(), timeout=60))
    assert via_mcp.structured_content["status"] == "declined", via_mcp
    assert "not in this quarter's plan" in json.dumps(via_mcp.structured_content)

    # The merchant charges the approved card: the real-time authorization and the capture
    # join the purchase's chain.
    out = subprocess.run(
        [
            roony_bin, "simulate", "charge",
            "--card", got["card"]["id"],
            "--amount", "6000",
            "--merchant", "ACME CLOUD HOSTING",
            "--merchant-country", "US",
            "--capture",
            "--stripe-base-url", dev["emulator"],
            "--stripe-account", account,
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr

    def chain_settled():
        d.get(f"{base}/transactions/{intent_id}")
        return d.find_elements(By.CSS_SELECTOR, "[data-test=authorization]") and d.find_elements(
            By.CSS_SELECTOR, "[data-test=settlement]"
        )

    eventually(chain_settled, "the authorization and capture in the chain")

    # Transactions: the purchase, its chain, the CSV export.
    d.get(f"{base}/transactions")
    assert intent_id in d.page_source
    shots(d, "transactions")
    d.get(f"{base}/transactions/{intent_id}")
    page = d.page_source
    assert "ok for the hosting renewal" in page
    assert got["card"]["last4"] in page
    assert got["card"]["number"] not in page if got["card"].get("number") else True
    shots(d, "transaction-chain")
    csv_text = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/transactions.csv', {credentials: 'same-origin'}).then(r => r.text()).then(done);"
    )
    lines = csv_text.splitlines()
    assert lines[0].startswith("intent_id") or "intent" in lines[0].lower(), lines[0]
    matching = [l for l in lines if intent_id in l]
    assert matching, csv_text[:500]
    assert '"Acme, ""Cloud"" Hosting"' in matching[0]
    assert "60.00" in matching[0]

    # The other pages render.
    for path, name in [
        ("/", "overview"),
        ("/policies", "policies"),
        ("/discrepancies", "discrepancies"),
        ("/audit", "audit-log"),
        ("/settings", "settings"),
    ]:
        d.get(f"{base}{path}")
        assert d.find_element(By.TAG_NAME, "h1").text
        shots(d, name)
    d.get(f"{base}/")
    assert d.find_elements(By.CSS_SELECTOR, "svg"), "the overview has charts"

    # Disconnect Stripe: the sidecar stops issuing with stripe_account_disconnected.
    d.get(f"{base}/stripe")
    d.execute_script("window.confirm = function () { return true; };")
    d.find_element(By.ID, "disconnect-stripe").click()
    eventually(lambda: "stripe disconnected" in flash(d), "the disconnect confirmation")
    assert d.find_element(By.ID, "stripe-connection").get_attribute("data-status") == "disconnected"

    def declined_disconnected():
        got = buy(sidecar, 500, "Namecheap", "https://www.namecheap.com", "after disconnect")
        return got.get("status") in ("declined", "failed") and "stripe_account_disconnected" in json.dumps(got)

    eventually(declined_disconnected, "purchases to decline as stripe_account_disconnected")

    # Sign out: the session ends.
    d.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
    eventually(lambda: "/login" in d.current_url, "the sign-in page after sign-out")
    d.get(f"{base}/settings")
    assert "/login" in d.current_url
