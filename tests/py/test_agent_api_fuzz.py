"""Property-based fuzzing of the agent API against its committed OpenAPI spec.

schemathesis generates valid and invalid requests for every operation of
``openapi/roony-agent.json`` and sends them to a real ``roony dev`` sidecar (with its
Stripe emulator). Every response goes through all of schemathesis' checks: no 5xx, only
documented status codes and content types, bodies that match the response schemas,
invalid input rejected and valid input accepted. On top of that every 4xx must be a JSON
error with a stable snake_case ``error.code`` and a message.

"Valid input accepted" has two documented refinements for ``POST /api/v1/purchase_intent``:

- 402 is an answer to a well-formed purchase: the policy declined it (per-purchase limit,
  daily budget, blocked category...).
- 422 with one of ``SEMANTIC_CODES`` is a rule JSON Schema cannot state: membership in the
  ISO 4217 / ISO 3166 / Stripe category lists, agreement between two fields, or an
  idempotency key already used for another request. Every other 422 for a spec-valid
  purchase is a failure (the spec should have said so, or the server is wrong).

The run is deterministic (fixed seed, no example database) and bounded to well under two
minutes on two cores.
"""

import copy
import json
import re
import zlib
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis.checks import positive_data_acceptance as builtin_positive_data_acceptance

from conftest import start_dev

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "openapi" / "roony-agent.json"
AGENT_KEY = "fuzz_agent_key_0123456789abcdef"
SEED = 20261122
MAX_EXAMPLES = 150
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")

PURCHASE = ("POST", "/api/v1/purchase_intent")
# 422 codes a spec-valid purchase may still get; each is a rule JSON Schema cannot express.
SEMANTIC_CODES = {
    "unknown_currency",  # a well-formed code that is not in ISO 4217
    "invalid_country",  # two letters that are not an assigned ISO 3166-1 country
    "unknown_category",  # not one of Stripe's ~300 merchant category names
    "category_mcc_mismatch",  # merchant.category and merchant.mcc disagree
    "merchant_domain_conflict",  # merchant.url and merchant.domain name different hosts
    "line_items_mismatch",  # line items do not add up to amount
    "idempotency_key_conflict",  # Idempotency-Key header and body idempotency_key differ
    "idempotency_key_reused",  # the key was used before with a different body
}

schema = schemathesis.openapi.from_path(
    SPEC,
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # Through the spec's security scheme, so schemathesis knows which requests carry
            # the key (and its ignored_auth check can try them without it).
            "auth": {"openapi": {"agent_key": {"bearer": AGENT_KEY}}},
            # Nothing is written to the working tree (no .schemathesis/ crash cache).
            "cache": {"enabled": False},
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            # Every built-in check; positive_data_acceptance runs through the wrapper below.
            "checks": {"positive_data_acceptance": {"enabled": False}},
        }
    ),
)


KNOWN = {  # values the server knows, to swap in for spec-valid but unknown ones
    "currency": ["usd", "USD", "eur", "jpy"],
    "country": ["US", "de", "GB"],
    "category": ["computer_software_stores", "betting_casino_gambling", "book_stores"],
}


def _pick(options, seed):
    return options[seed % len(options)]


@schema.hook
def map_case(context, case):
    """Steer most valid purchases past the semantic rules, into the policy engine and card issuing.

    Random spec-valid purchases nearly always stop at a semantic 422 (an unknown currency
    code, line items that do not add up...). For three valid purchases in four this swaps in
    known codes, makes line items add up, and derives the idempotency key from the body, so
    the fuzzer reaches approvals, declines, the daily budget, card issuing and replays. Only
    positive cases are touched, and they stay spec-valid; invalid cases are left as drawn.
    """
    meta = case.meta
    if (
        (case.method.upper(), case.path) != PURCHASE
        or meta is None
        or not meta.generation.mode.is_positive
        or not isinstance(case.body, dict)
    ):
        return case
    seed = zlib.crc32(json.dumps(case.body, sort_keys=True, default=str).encode())
    if seed % 4 == 0:
        return case
    body = copy.deepcopy(case.body)
    body["currency"] = _pick(KNOWN["currency"], seed)
    merchant = body.get("merchant")
    if isinstance(merchant, dict):
        if merchant.get("country") is not None:
            merchant["country"] = _pick(KNOWN["country"], seed >> 2)
        if merchant.get("category") is not None:
            merchant["category"] = _pick(KNOWN["category"], seed >> 4)
            merchant.pop("mcc", None)  # an MCC would have to match the category
        if merchant.get("url") is not None:
            merchant.pop("domain", None)  # the domain would have to match the URL's host
    items = body.get("line_items")
    if items:
        total = sum(item.get("quantity", 1) * item["unit_amount"] for item in items)
        if 1 <= total <= 99_999_999:
            body["amount"] = total
        else:
            body.pop("line_items")
    # Same key only for the same body: a replay, never idempotency_key_reused.
    digest = f"{zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()):08x}"
    if body.get("idempotency_key") is not None:
        body["idempotency_key"] = f"{body['idempotency_key'][:240]}.{digest}"
    if case.headers and case.headers.get("Idempotency-Key") is not None:
        case.headers["Idempotency-Key"] = body.get("idempotency_key") or f"fuzz.{digest}"
    case.body = body
    return case


def _error_code(response):
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def roony_positive_data_acceptance(ctx, response, case):
    """positive_data_acceptance, plus 402 declines and the semantic 422s (module docstring)."""
    if (case.method.upper(), case.path) == PURCHASE and (
        response.status_code == 402
        or (response.status_code == 422 and _error_code(response) in SEMANTIC_CODES)
    ):
        return None
    return builtin_positive_data_acceptance(ctx, response, case)


def errors_have_stable_codes(ctx, response, case):
    """Every 4xx is a JSON error object with a snake_case code and a message."""
    if not 400 <= response.status_code < 500:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), (
        f"{response.status_code} is not JSON"
    )
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"{response.status_code} has no error object: {body!r}"
    assert isinstance(error.get("code"), str) and SNAKE_CASE.match(error["code"]), (
        f"{response.status_code} error.code is not a stable snake_case code: {error!r}"
    )
    assert isinstance(error.get("message"), str) and error["message"].strip(), (
        f"{response.status_code} error has no message: {error!r}"
    )
    return None


CHECKS = dict(
    excluded_checks=[builtin_positive_data_acceptance],
    additional_checks=[roony_positive_data_acceptance, errors_have_stable_codes],
)


def _start_sidecar(spawn, data_dir):
    """Start `roony dev`; return the sidecar's base URL."""
    # The fuzzer sends hundreds of requests a second with one key (and without keys, to
    # check authentication); rate limiting has its own tests (tests/ratelimit.rs).
    no_limits = {
        "ROONY_RATE_LIMIT_PER_SECOND": "0",
        "ROONY_UNAUTHENTICATED_RATE_LIMIT_PER_SECOND": "0",
    }
    return start_dev(spawn, data_dir, AGENT_KEY, env=no_limits)[1]


@pytest.fixture(scope="module")
def sidecar(spawn_module, tmp_path_factory):
    return _start_sidecar(spawn_module, tmp_path_factory.mktemp("roony-fuzz"))


@schema.parametrize()
def test_agent_api_conforms_to_its_spec(case, sidecar):
    case.call_and_validate(base_url=sidecar, timeout=10, **CHECKS)


class _Workflow(schema.as_state_machine()):
    """Chains operations along the spec's links (create → get / cancel / list)."""

    base_url = None

    def get_call_kwargs(self, case):
        return {"base_url": self.base_url, "timeout": 10}

    def validate_response(self, response, case, additional_checks=None, **kwargs):
        case.validate_response(
            response,
            excluded_checks=CHECKS["excluded_checks"],
            additional_checks=CHECKS["additional_checks"],
            transport_kwargs=kwargs,
            recorder=self.recorder,  # for the checks that look back along the scenario
        )


def test_agent_api_stateful(sidecar):
    _Workflow.base_url = sidecar
    _Workflow.run(
        settings=hypothesis.settings(
            max_examples=25,
            stateful_step_count=6,
            database=None,
            derandomize=True,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )


ENDPOINTS = [
    ("POST", "/api/v1/purchase_intent"),
    ("GET", "/api/v1/purchase_intents"),
    ("GET", "/api/v1/purchase_intents/pur_doesnotexist"),
    ("POST", "/api/v1/purchase_intents/pur_doesnotexist/cancel"),
    ("GET", "/api/v1/budget"),
]


def test_spec_lists_every_authenticated_endpoint():
    """ENDPOINTS covers every operation the spec protects with the agent key."""
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    secured = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if op.get("security")
    }
    listed = {(m, re.sub(r"pur_doesnotexist", "{id}", p)) for m, p in ENDPOINTS}
    assert secured == listed


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_agent_key"),
        ({"Authorization": "Basic Zm9vOmJhcg=="}, "missing_agent_key"),
        ({"Authorization": "Bearer "}, "missing_agent_key"),
        ({"Authorization": "Bearer not_the_agent_key_0123456789"}, "invalid_agent_key"),
        ({"Authorization": f"Bearer {AGENT_KEY}x"}, "invalid_agent_key"),
    ],
    ids=["no-header", "basic", "empty-bearer", "wrong-key", "key-prefix"],
)
def test_unauthenticated_requests_get_401(sidecar, headers, code):
    body = {
        "amount": 1200,
        "currency": "usd",
        "merchant": {"name": "Namecheap"},
        "description": "one domain",
    }
    for method, path in ENDPOINTS:
        r = requests.request(
            method,
            sidecar + path,
            headers=headers,
            json=body if method == "POST" else None,
            timeout=10,
        )
        assert r.status_code == 401, f"{method} {path} with {headers} → {r.status_code} {r.text}"
        assert r.headers["content-type"].startswith("application/json")
        assert r.headers.get("www-authenticate", "").startswith("Bearer")
        error = r.json()["error"]
        assert error["code"] in {"missing_agent_key", "invalid_agent_key"}, error
        assert error["code"] == code, f"{method} {path} with {headers}: {error}"
        assert error["message"]


@pytest.mark.parametrize("method,path", [("GET", "/{}"), ("POST", "/{}/cancel")])
def test_undecodable_intent_id_is_a_json_404(sidecar, method, path):
    """An id that is not UTF-8 (schemathesis only draws text) names no intent."""
    url = sidecar + "/api/v1/purchase_intents" + path.format("pur_%FF")
    r = requests.request(method, url, headers={"Authorization": f"Bearer {AGENT_KEY}"}, timeout=10)
    assert r.status_code == 404, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "intent_not_found"
