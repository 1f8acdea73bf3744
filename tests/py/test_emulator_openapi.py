"""The Stripe emulator's responses checked against Stripe's OpenAPI schemas.

Spawns ``$ROONY_BIN stripe-emulator --listen 127.0.0.1:0``, drives the Issuing
endpoints with plain HTTP (``expand[]=`` style, as Stripe's own SDKs send it) and
validates every body against the 2023-08-16 component schemas extracted into
``tests/fixtures/stripe-issuing-schemas-2023-08-16.json``.
"""

import json
import threading
import time
from pathlib import Path

import pytest
import requests
from jsonschema.exceptions import ValidationError
from openapi_schema_validator import OAS30Validator

FIXTURE = (
    Path(__file__).resolve().parent.parent
    / "fixtures"
    / "stripe-issuing-schemas-2023-08-16.json"
)
KEY = "sk_test_emulator"

# Matches only null: `nullable` lets the `type` check pass for None, `enum` keeps
# every other value out.
NULL_ONLY = {"type": "object", "nullable": True, "enum": [None]}


def stripe_nullable(node):
    """Read ``nullable`` the way Stripe's spec means it: the value may be null.

    openapi-schema-validator follows OpenAPI 3.0.3, where ``nullable`` only widens
    ``type`` in the same schema object: it is ignored on ``{"anyOf": [{"$ref": ...}],
    "nullable": true}`` (no ``type``), and an ``enum`` must list ``null`` itself. Stripe
    writes optional sub-objects and nullable enums exactly that way and sends ``null``
    for them, so: add a null-only branch to such ``anyOf``s and ``null`` to such enums.
    """
    if isinstance(node, dict):
        node = {k: stripe_nullable(v) for k, v in node.items()}
        if node.get("nullable") is True:
            if "type" not in node and "anyOf" in node:
                node["anyOf"] = node["anyOf"] + [NULL_ONLY]
            if "enum" in node and None not in node["enum"]:
                node["enum"] = node["enum"] + [None]
        return node
    if isinstance(node, list):
        return [stripe_nullable(v) for v in node]
    return node


SCHEMAS = stripe_nullable(json.loads(FIXTURE.read_text()))


def validate(schema_name, body):
    """Validate ``body`` against ``#/components/schemas/<schema_name>``."""
    schema = {
        "$ref": f"#/components/schemas/{schema_name}",
        "components": SCHEMAS["components"],
    }
    OAS30Validator(schema).validate(body)
    return body


def luhn_valid(number):
    digits = [int(c) for c in number]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@pytest.fixture(scope="module")
def base_url(spawn_module):
    _, url = spawn_module(["stripe-emulator", "--listen", "127.0.0.1:0"])
    return url


@pytest.fixture
def api(base_url):
    """A session with a test key; state is reset before each test."""
    requests.post(f"{base_url}/_emulator/reset", timeout=10).raise_for_status()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {KEY}"
    session.headers["Stripe-Version"] = "2023-08-16"
    session.base = base_url

    def call(method, path, data=None, params=None, headers=None, expect=200):
        resp = session.request(
            method,
            f"{base_url}{path}",
            data=data,
            params=params,
            headers=headers,
            timeout=10,
        )
        assert resp.status_code == expect, (resp.status_code, resp.text)
        assert resp.headers["Content-Type"].startswith("application/json")
        assert resp.headers["Request-Id"].startswith("req_")
        return resp

    session.call = call
    return session


CARDHOLDER = [
    ("name", "Jenny Rosen"),
    ("email", "jenny@example.com"),
    ("phone_number", "+18008675309"),
    ("billing[address][line1]", "510 Townsend St"),
    ("billing[address][city]", "San Francisco"),
    ("billing[address][state]", "CA"),
    ("billing[address][postal_code]", "94103"),
    ("billing[address][country]", "US"),
    ("metadata[team]", "agents"),
]


def create_cardholder(api, extra=()):
    body = api.call("POST", "/v1/issuing/cardholders", data=CARDHOLDER + list(extra)).json()
    return validate("issuing.cardholder", body)


def create_card(api, cardholder_id, extra=(), **kw):
    data = [
        ("cardholder", cardholder_id),
        ("currency", "usd"),
        ("type", "virtual"),
        ("status", "active"),
    ] + list(extra)
    return api.call("POST", "/v1/issuing/cards", data=data, **kw)


def test_cardholder_create_retrieve_update_list(api):
    holder = create_cardholder(
        api,
        [
            ("individual[first_name]", "Jenny"),
            ("individual[last_name]", "Rosen"),
            ("individual[dob][day]", "1"),
            ("individual[dob][month]", "2"),
            ("individual[dob][year]", "1990"),
            ("individual[card_issuing][user_terms_acceptance][date]", "1700000000"),
            ("individual[card_issuing][user_terms_acceptance][ip]", "127.0.0.1"),
            ("preferred_locales[]", "en"),
            ("spending_controls[spending_limits][0][amount]", "100000"),
            ("spending_controls[spending_limits][0][interval]", "monthly"),
            ("spending_controls[blocked_categories][]", "betting_casino_gambling"),
        ],
    )
    assert holder["id"].startswith("ich_")
    assert holder["object"] == "issuing.cardholder"
    assert holder["livemode"] is False
    assert holder["individual"]["dob"] == {"day": 1, "month": 2, "year": 1990}
    assert holder["spending_controls"]["spending_limits"][0]["interval"] == "monthly"

    got = validate(
        "issuing.cardholder",
        api.call("GET", f"/v1/issuing/cardholders/{holder['id']}").json(),
    )
    assert got == holder

    updated = validate(
        "issuing.cardholder",
        api.call(
            "POST",
            f"/v1/issuing/cardholders/{holder['id']}",
            data=[("status", "inactive"), ("metadata[team]", ""), ("company[tax_id]", "000")],
        ).json(),
    )
    assert updated["status"] == "inactive"
    assert updated["metadata"] == {}

    company = create_cardholder(api, [("type", "company")])
    listed = validate(
        "IssuingCardholderList", api.call("GET", "/v1/issuing/cardholders").json()
    )
    assert [c["id"] for c in listed["data"]] == [company["id"], holder["id"]]
    assert listed["has_more"] is False
    only = validate(
        "IssuingCardholderList",
        api.call("GET", "/v1/issuing/cardholders", params={"status": "inactive"}).json(),
    )
    assert [c["id"] for c in only["data"]] == [holder["id"]]


def test_card_create_retrieve_update_list(api):
    holder = create_cardholder(api)
    card = validate(
        "issuing.card",
        create_card(
            api,
            holder["id"],
            [
                ("spending_controls[spending_limits][0][amount]", "5000"),
                ("spending_controls[spending_limits][0][interval]", "all_time"),
                ("spending_controls[spending_limits][0][categories][]", "computer_software_stores"),
                ("spending_controls[allowed_categories][]", "computer_software_stores"),
                ("spending_controls[allowed_categories][]", "digital_goods_applications"),
                ("spending_controls[blocked_merchant_countries][]", "RU"),
                ("metadata[intent_id]", "pi_123"),
                ("expand[]", "number"),
                ("expand[]", "cvc"),
            ],
        ).json(),
    )
    assert card["id"].startswith("ic_")
    assert card["cardholder"] == holder, "the full cardholder object is embedded"
    assert "number" not in card and "cvc" not in card
    assert card["brand"] == "Visa"
    assert card["spending_controls"]["allowed_categories"] == [
        "computer_software_stores",
        "digital_goods_applications",
    ]
    assert card["spending_controls"]["blocked_merchant_countries"] == ["RU"]
    assert card["spending_controls"]["spending_limits_currency"] == "usd"
    assert card["metadata"] == {"intent_id": "pi_123"}

    full = validate(
        "issuing.card",
        api.call(
            "GET",
            f"/v1/issuing/cards/{card['id']}",
            params=[("expand[]", "number"), ("expand[]", "cvc")],
        ).json(),
    )
    assert len(full["number"]) == 16 and luhn_valid(full["number"])
    assert full["number"].endswith(full["last4"])
    assert len(full["cvc"]) == 3 and full["cvc"].isdigit()

    canceled = validate(
        "issuing.card",
        api.call(
            "POST",
            f"/v1/issuing/cards/{card['id']}",
            data={"status": "canceled", "cancellation_reason": "stolen"},
        ).json(),
    )
    assert canceled["status"] == "canceled"
    assert canceled["cancellation_reason"] == "stolen"
    assert "number" not in canceled

    create_card(api, holder["id"])
    listed = validate("IssuingCardList", api.call("GET", "/v1/issuing/cards").json())
    assert listed["url"] == "/v1/issuing/cards"
    assert len(listed["data"]) == 2
    assert all("number" not in c and "cvc" not in c for c in listed["data"])
    page = validate(
        "IssuingCardList",
        api.call(
            "GET",
            "/v1/issuing/cards",
            params={"limit": "1", "status": "canceled", "created[gte]": str(card["created"])},
        ).json(),
    )
    assert [c["id"] for c in page["data"]] == [card["id"]]


def test_physical_card_shape(api):
    holder = create_cardholder(api)
    card = validate(
        "issuing.card",
        api.call(
            "POST",
            "/v1/issuing/cards",
            data={
                "cardholder": holder["id"],
                "currency": "usd",
                "type": "physical",
                "shipping[name]": "Jenny Rosen",
                "shipping[service]": "express",
                "shipping[address][line1]": "510 Townsend St",
                "shipping[address][city]": "San Francisco",
                "shipping[address][postal_code]": "94103",
                "shipping[address][country]": "US",
            },
        ).json(),
    )
    assert card["type"] == "physical"
    assert card["status"] == "inactive"
    assert card["shipping"]["status"] == "pending"
    full = api.call(
        "GET", f"/v1/issuing/cards/{card['id']}", params=[("expand[]", "number")]
    ).json()
    assert "number" not in full, "numbers are only revealed for virtual cards"


def test_errors_match_the_error_schema(api):
    holder = create_cardholder(api)
    cases = [
        # (method, path, data, headers, status, code)
        ("GET", "/v1/issuing/cards/ic_missing", None, None, 404, "resource_missing"),
        ("GET", "/v1/issuing/cardholders/ich_missing", None, None, 404, "resource_missing"),
        ("POST", "/v1/issuing/cards", {"currency": "usd", "type": "virtual"}, None, 400, "parameter_missing"),
        ("POST", "/v1/issuing/cards", {"currency": "usd", "type": "virtual", "cardholder": "ich_nope"}, None, 400, "resource_missing"),
        ("POST", "/v1/issuing/cards", {"currency": "usd", "type": "virtual", "cardholder": holder["id"], "nope": "1"}, None, 400, "parameter_unknown"),
        ("GET", "/v1/issuing/cards", {"limit": "500"}, None, 400, "parameter_invalid_integer"),
        ("GET", "/v1/foo", None, None, 404, None),
        ("GET", "/v1/issuing/cards", None, {"Authorization": "Bearer sk_live_123"}, 401, None),
        ("GET", "/v1/issuing/cards", None, {"Authorization": ""}, 401, None),
        ("GET", "/v1/issuing/cards", None, {"Stripe-Account": "not-an-account"}, 403, "account_invalid"),
    ]
    for method, path, data, headers, status, code in cases:
        kwargs = {"params": data} if method == "GET" else {"data": data}
        body = api.call(method, path, headers=headers, expect=status, **kwargs).json()
        validate("error", body)
        assert body["error"].get("code") == code, (path, body)
        assert body["error"]["message"]

    exclusive = api.call(
        "POST",
        "/v1/issuing/cards",
        data=[
            ("cardholder", holder["id"]),
            ("currency", "usd"),
            ("type", "virtual"),
            ("spending_controls[allowed_merchant_countries][]", "US"),
            ("spending_controls[blocked_merchant_countries][]", "RU"),
        ],
        expect=400,
    ).json()
    validate("error", exclusive)
    bad_category = api.call(
        "POST",
        "/v1/issuing/cards",
        data=[
            ("cardholder", holder["id"]),
            ("currency", "usd"),
            ("type", "virtual"),
            ("spending_controls[allowed_categories][]", "not_a_category"),
        ],
        expect=400,
    ).json()
    validate("error", bad_category)
    assert bad_category["error"]["param"] == "spending_controls[allowed_categories][0]"


def test_idempotency_replay_and_mismatch(api):
    holder = create_cardholder(api)
    headers = {"Idempotency-Key": "intent-1"}
    first = create_card(api, holder["id"], headers=headers)
    second = create_card(api, holder["id"], headers=headers)
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Original-Request"] == first.headers["Request-Id"]
    assert second.headers["Idempotency-Key"] == "intent-1"
    mismatch = create_card(api, holder["id"], [("metadata[x]", "y")], headers=headers, expect=400).json()
    validate("error", mismatch)
    assert mismatch["error"]["type"] == "idempotency_error"
    other_endpoint = api.call(
        "POST", "/v1/issuing/cardholders", data=CARDHOLDER, headers=headers, expect=400
    ).json()
    validate("error", other_endpoint)
    stats = requests.get(f"{api.base}/_emulator/stats", timeout=10).json()
    assert stats["requests"]["POST /v1/issuing/cards"]["executed"] == 1
    assert stats["requests"]["POST /v1/issuing/cards"]["replayed"] == 1
    assert stats["objects"]["issuing.card"] == 1
    assert stats["stripe_versions"]["2023-08-16"] >= 4


def test_concurrent_same_key_is_409(api):
    holder = create_cardholder(api)
    requests.post(
        f"{api.base}/_emulator/faults", json={"latency_ms": 400}, timeout=10
    ).raise_for_status()
    data = {"cardholder": holder["id"], "currency": "usd", "type": "virtual"}
    results = {}

    def run(name, delay):
        time.sleep(delay)
        results[name] = api.post(
            f"{api.base}/v1/issuing/cards",
            data=data,
            headers={"Idempotency-Key": "same"},
            timeout=10,
        )

    threads = [
        threading.Thread(target=run, args=("first", 0.0)),
        threading.Thread(target=run, args=("second", 0.15)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    requests.post(f"{api.base}/_emulator/faults", json={}, timeout=10).raise_for_status()
    assert results["first"].status_code == 200, results["first"].text
    assert results["second"].status_code == 409, results["second"].text
    conflict = validate("error", results["second"].json())
    assert conflict["error"]["code"] == "idempotency_key_in_use"
    replay = api.call(
        "POST", "/v1/issuing/cards", data=data, headers={"Idempotency-Key": "same"}
    )
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == results["first"].json()["id"]


def test_fail_next_faults(api):
    holder = create_cardholder(api)
    faults = {
        "rate_429": 0.0,
        "rate_500": 0.0,
        "latency_ms": 0,
        "fail_next": [
            {"status": 429, "path_prefix": "/v1/issuing/cards", "method": "POST", "count": 1},
            {"status": 503, "path_prefix": "/v1/issuing/cards", "method": "GET", "count": 1},
        ],
    }
    resp = requests.post(f"{api.base}/_emulator/faults", json=faults, timeout=10)
    assert resp.status_code == 200, resp.text
    assert requests.get(f"{api.base}/_emulator/faults", timeout=10).json() == faults

    limited = create_card(api, holder["id"], headers={"Idempotency-Key": "k"}, expect=429).json()
    validate("error", limited)
    assert limited["error"]["code"] == "rate_limit"
    # the fault was not saved under the key: the retry executes
    card = validate("issuing.card", create_card(api, holder["id"], headers={"Idempotency-Key": "k"}).json())
    unavailable = api.call("GET", f"/v1/issuing/cards/{card['id']}", expect=503).json()
    validate("error", unavailable)
    assert unavailable["error"]["type"] == "api_error"
    api.call("GET", f"/v1/issuing/cards/{card['id']}")
    assert requests.get(f"{api.base}/_emulator/faults", timeout=10).json()["fail_next"] == []

    bad = requests.post(f"{api.base}/_emulator/faults", json={"rate_429": 2}, timeout=10)
    assert bad.status_code == 400
    typo = requests.post(f"{api.base}/_emulator/faults", json={"rate429": 0.1}, timeout=10)
    assert typo.status_code == 400


def test_stripe_account_scoping(api):
    acct = {"Stripe-Account": "acct_1TestConnected"}
    holder = api.call("POST", "/v1/issuing/cardholders", data=CARDHOLDER, headers=acct).json()
    validate("issuing.cardholder", holder)
    card = validate("issuing.card", create_card(api, holder["id"], headers=acct).json())
    api.call("GET", f"/v1/issuing/cards/{card['id']}", expect=404)
    api.call("GET", f"/v1/issuing/cards/{card['id']}", headers=acct)
    empty = validate("IssuingCardList", api.call("GET", "/v1/issuing/cards").json())
    assert empty["data"] == []
    mine = validate("IssuingCardList", api.call("GET", "/v1/issuing/cards", headers=acct).json())
    assert [c["id"] for c in mine["data"]] == [card["id"]]


def test_form_encoding_variants(api):
    holder = create_cardholder(api)
    raw = (
        f"cardholder={holder['id']}&currency=usd&type=virtual"
        "&spending_controls[spending_limits][][amount]=700"
        "&spending_controls[spending_limits][][interval]=per_authorization"
        "&spending_controls%5Bblocked_categories%5D%5B%5D=florists"
        "&metadata[note]=hello+world%21"
    )
    card = validate(
        "issuing.card",
        api.call(
            "POST",
            "/v1/issuing/cards",
            data=raw,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ).json(),
    )
    assert card["spending_controls"]["spending_limits"] == [
        {"amount": 700, "categories": None, "interval": "per_authorization"}
    ]
    assert card["spending_controls"]["blocked_categories"] == ["florists"]
    assert card["metadata"] == {"note": "hello world!"}
    for query in ("expand[]=number", "expand%5B%5D=number", "expand[0]=number"):
        got = api.call("GET", f"/v1/issuing/cards/{card['id']}?{query}").json()
        validate("issuing.card", got)
        assert luhn_valid(got["number"]), query
        assert "cvc" not in got


def test_basic_auth_and_control_api(api):
    resp = requests.get(
        f"{api.base}/v1/issuing/cards", auth=(KEY, ""), timeout=10
    )
    assert resp.status_code == 200
    validate("IssuingCardList", resp.json())
    assert requests.get(f"{api.base}/_emulator/nope", timeout=10).status_code == 404
    assert requests.get(f"{api.base}/_emulator/reset", timeout=10).status_code == 405
    stats = requests.get(f"{api.base}/_emulator/stats", timeout=10).json()
    assert stats["requests"]["GET /v1/issuing/cards"]["executed"] == 1


def test_schema_check_is_not_vacuous(api):
    """The validator set-up must still reject wrong shapes."""
    holder = create_cardholder(api)
    card = create_card(api, holder["id"]).json()
    validate("issuing.card", card)
    broken = [
        {**card, "status": "bogus"},
        {k: v for k, v in card.items() if k != "brand"},
        {**card, "cardholder": holder["id"]},  # must be embedded, not an id
        {**card, "spending_controls": {**card["spending_controls"], "allowed_categories": ["nope"]}},
        {**card, "wallets": {"apple_pay": None}},
    ]
    for body in broken:
        with pytest.raises(ValidationError):
            validate("issuing.card", body)
    with pytest.raises(ValidationError):
        validate("error", {"error": {"message": "no type"}})
    with pytest.raises(ValidationError):
        validate("IssuingCardList", {"object": "list", "data": [], "has_more": False, "url": "/v1/charges"})
