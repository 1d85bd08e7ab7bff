"""Token checks: the Verifier's rules, token extraction, and 401 at the upgrade door."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from fastws.auth import Principal, Verifier, extract_token, mint
from fastws.config import Settings
from fastws.errors import AuthError, ConfigError
from fastws.logs import configure
from fastws.server import Node

from .utils import (
    SECRET,
    TIMEOUT,
    recv_json,
    running_node,
    send_json,
    server_process,
    token,
    ws_url,
)

OTHER_SECRET = "another-secret-also-long-enough-for-hs256-use!"
SECRET_64 = "a-sixty-four-byte-secret-so-that-hs512-signing-raises-no-warning!"
AUD = "fastws"
ISS = "https://auth.example.com"


# ---- helpers ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "userId": "u1",
        "username": "alice",
        "roles": ["member"],
        "iat": now,
        "exp": now + 3600,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _hs(key: str | bytes = SECRET, algorithm: str = "HS256", **over: Any) -> str:
    """A token signed with PyJWT; ``over`` replaces claims (None drops one)."""
    return jwt.encode(_claims(**over), key, algorithm=algorithm)


def _by_hand(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built without PyJWT: HS256 over ``hmac_key``, or an empty signature if None.

    PyJWT refuses to HMAC-sign with a PEM key, which is exactly what an attacker would do.
    """
    signing_input = f"{_b64(_json(header))}.{_b64(_json(claims))}"
    sig = (
        b""
        if hmac_key is None
        else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{_b64(sig)}"


def _alg_none(**over: Any) -> str:
    return _by_hand({"alg": "none", "typ": "JWT"}, _claims(**over), None)


def _tampered(**over: Any) -> str:
    """A valid token whose payload is changed afterwards, keeping the original signature."""
    header, payload, sig = _hs().split(".")
    claims = json.loads(_unb64(payload))
    claims.update(over)
    return f"{header}.{_b64(_json(claims))}.{sig}"


def _hs_verifier(**over: Any) -> Verifier:
    return Verifier(Settings(**over), SECRET)


def _reject(verifier: Verifier, tok: str, reason: str | None = None) -> AuthError:
    """``verify`` raises AuthError (with ``reason`` if given) and the reason hides the token."""
    with pytest.raises(AuthError) as info:
        verifier.verify(tok)
    exc = info.value
    if reason is not None:
        assert exc.reason == reason
    for text in (exc.reason, str(exc)):
        assert tok not in text
        for segment in tok.split("."):
            if len(segment) >= 8:
                assert segment not in text
    return exc


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    public_pem: bytes
    public_file: str
    public_jwk: str


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _keypair(
        key,
        tmp_path_factory.mktemp("rsa") / "public.pem",
        jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()),
    )


@pytest.fixture(scope="module")
def ec_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    return _keypair(
        key,
        tmp_path_factory.mktemp("ec") / "public.pem",
        jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()),
    )


def _keypair(key: Any, path: Path, jwk: str) -> KeyPair:
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path.write_bytes(public_pem)
    return KeyPair(private_pem, public_pem, str(path), jwk)


def _rs_verifier(keys: KeyPair, algorithms: str = "RS256") -> Verifier:
    return Verifier(
        Settings(jwt_algorithms=algorithms, jwt_public_key_file=keys.public_file), SECRET
    )


# ---- A. Verifier --------------------------------------------------------------------------


def test_valid_hs256_token_gives_principal() -> None:
    """A valid HS256 token yields a Principal with user_id, username, roles and expiry."""
    exp = int(time.time()) + 600
    tok = _hs(userId="u42", username="Alice", roles=["admin", "mod"], exp=exp)
    assert _hs_verifier().verify(tok) == Principal("u42", "Alice", ("admin", "mod"), float(exp))


def test_sub_is_accepted_in_place_of_user_id() -> None:
    """Without userId the standard `sub` claim names the user."""
    principal = _hs_verifier().verify(_hs(userId=None, sub="s-7", username=None))
    assert principal.user_id == "s-7" and principal.username == "s-7"


def test_missing_exp_is_rejected() -> None:
    """A token without exp never expires, so it is refused with 'missing claim exp'."""
    _reject(_hs_verifier(), _hs(exp=None), "missing claim exp")


def test_expired_beyond_leeway_is_rejected() -> None:
    """exp further in the past than the leeway -> 'token expired'."""
    _reject(_hs_verifier(jwt_leeway=5.0), _hs(exp=int(time.time()) - 60), "token expired")


def test_expired_within_leeway_is_accepted() -> None:
    """exp just past, but within the configured clock-skew leeway, is still accepted."""
    tok = _hs(exp=int(time.time()) - 2)
    assert _hs_verifier(jwt_leeway=30.0).verify(tok).user_id == "u1"


def test_nbf_in_the_future_is_rejected() -> None:
    """nbf beyond the leeway in the future -> 'token not yet valid'."""
    _reject(_hs_verifier(), _hs(nbf=int(time.time()) + 120), "token not yet valid")


def test_wrong_secret_is_bad_signature() -> None:
    """A token signed with another HMAC secret -> 'bad signature'."""
    _reject(_hs_verifier(), _hs(key=OTHER_SECRET), "bad signature")


@pytest.mark.parametrize(
    "change", [{"userId": "mallory"}, {"roles": ["admin"]}, {"exp": 4102444800}]
)
def test_tampered_payload_is_rejected(change: dict[str, Any]) -> None:
    """Editing a claim while keeping the original signature fails the signature check."""
    _reject(_hs_verifier(), _tampered(**change), "bad signature")


def test_alg_none_is_rejected() -> None:
    """An unsigned `alg: none` token is refused as a disallowed algorithm."""
    _reject(_hs_verifier(), _alg_none(), "algorithm not allowed")


def test_alg_none_is_rejected_even_with_a_signature_attached() -> None:
    """`alg: none` with a (valid HS256) signature appended is still refused."""
    header, payload, _ = _alg_none().split(".")
    sig = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    _reject(_hs_verifier(), f"{header}.{payload}.{_b64(sig)}", "algorithm not allowed")


def test_hs512_is_rejected_when_only_hs256_is_allowed() -> None:
    """A correctly signed HS512 token is refused when only HS256 is configured."""
    verifier = Verifier(Settings(jwt_algorithms="HS256"), SECRET_64)
    assert verifier.verify(_hs(key=SECRET_64)).user_id == "u1"
    _reject(verifier, _hs(key=SECRET_64, algorithm="HS512"), "algorithm not allowed")


@pytest.mark.parametrize(
    "garbage",
    [
        "not-a-jwt",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9..",
        "x" * 500,
        "\u00e9\u00e8.\u00e0.\u00fc",
    ],
)
def test_garbage_is_rejected(garbage: str) -> None:
    """Strings that are not JWTs raise AuthError, never another exception."""
    _reject(_hs_verifier(), garbage)


def test_right_audience_and_issuer_are_accepted() -> None:
    """With aud and iss configured, a token carrying exactly those is accepted."""
    assert _hs_verifier(jwt_audience=AUD, jwt_issuer=ISS).verify(_hs(aud=AUD, iss=ISS))


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"aud": "other"}, "audience doesn't match"),
        ({"aud": None}, "missing claim aud"),
        ({"aud": "fastws-admin"}, "audience doesn't match"),
        ({"aud": "fast"}, "audience doesn't match"),
        ({"iss": "https://evil.example.com"}, "invalid issuer"),
        ({"iss": None}, "missing claim iss"),
        ({"iss": "https://auth.example"}, "invalid issuer"),
        ({"iss": "auth.example.com"}, "invalid issuer"),
        ({"iss": ISS + ".evil.net"}, "invalid issuer"),
    ],
    ids=[
        "wrong-aud",
        "missing-aud",
        "aud-superstring",
        "aud-prefix",
        "wrong-iss",
        "missing-iss",
        "iss-prefix",
        "iss-substring",
        "iss-superstring",
    ],
)
def test_wrong_or_missing_audience_or_issuer_is_rejected(
    over: dict[str, Any], reason: str | None
) -> None:
    """aud/iss must match exactly; missing, wrong or partial (substring/prefix) are refused."""
    claims = {"aud": AUD, "iss": ISS, **over}
    _reject(_hs_verifier(jwt_audience=AUD, jwt_issuer=ISS), _hs(**claims), reason)


def test_issuer_given_as_a_list_is_rejected() -> None:
    """An iss claim that is a list containing the expected issuer is not an exact match."""
    tok = _by_hand({"alg": "HS256", "typ": "JWT"}, _claims(aud=AUD, iss=[ISS]), SECRET.encode())
    _reject(_hs_verifier(jwt_audience=AUD, jwt_issuer=ISS), tok)


def test_rs256_with_public_key_file_is_accepted(rsa_keys: KeyPair) -> None:
    """RS256 tokens signed with the private key verify against the PEM public key file."""
    tok = _hs(key=rsa_keys.private_pem, algorithm="RS256")
    assert _rs_verifier(rsa_keys).verify(tok).user_id == "u1"


def test_rs256_signed_by_another_key_is_rejected(rsa_keys: KeyPair) -> None:
    """An RS256 token from a different private key -> 'bad signature'."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tok = jwt.encode(_claims(), other, algorithm="RS256")
    _reject(_rs_verifier(rsa_keys), tok, "bad signature")


@pytest.mark.parametrize("form", ["pem", "pem-stripped", "jwk"])
def test_hs_rs_confusion_is_rejected(rsa_keys: KeyPair, form: str) -> None:
    """With RS256 configured, HS256 signed with the public key (PEM or JWK) as secret fails."""
    secret = {
        "pem": rsa_keys.public_pem,
        "pem-stripped": rsa_keys.public_pem.strip(),
        "jwk": rsa_keys.public_jwk.encode(),
    }[form]
    tok = _by_hand({"alg": "HS256", "typ": "JWT"}, _claims(), secret)
    _reject(_rs_verifier(rsa_keys), tok, "algorithm not allowed")


def test_es256_with_ec_key_is_accepted(ec_keys: KeyPair) -> None:
    """ES256 tokens signed with an EC P-256 key verify against its public key file."""
    tok = _hs(key=ec_keys.private_pem, algorithm="ES256", userId="ec-user")
    assert _rs_verifier(ec_keys, "ES256").verify(tok).user_id == "ec-user"


@pytest.mark.parametrize("algorithms", ["HS256,RS256", "RS256,HS256", "ES256, HS512"])
def test_mixing_hmac_and_public_key_algorithms_is_a_config_error(
    rsa_keys: KeyPair, algorithms: str
) -> None:
    """A config that accepts both HMAC and public-key algorithms is refused outright."""
    with pytest.raises(ConfigError):
        _rs_verifier(rsa_keys, algorithms)


def test_public_key_algorithm_without_key_file_is_a_config_error() -> None:
    """RS256 without --jwt-public-key-file is refused at startup, not at first handshake."""
    with pytest.raises(ConfigError):
        Verifier(Settings(jwt_algorithms="RS256"), SECRET)


@pytest.mark.parametrize(
    "over",
    [
        {"userId": None},
        {"userId": None, "sub": ""},
        {"userId": True},
        {"userId": None, "sub": ["x"]},
    ],
    ids=["absent", "empty-sub", "bool", "list-sub"],
)
def test_missing_or_bad_user_id_is_rejected(over: dict[str, Any]) -> None:
    """Without a usable userId or sub claim the token names nobody and is refused."""
    # A non-string sub is already refused by PyJWT's own sub check, with another reason.
    reason = None if over.get("sub") else "token has no userId or sub claim"
    _reject(_hs_verifier(), _hs(**over), reason)


@pytest.mark.parametrize("roles", ["admin", {"admin": True}, [1, 2], ["ok", None]])
def test_roles_that_are_not_a_list_of_strings_are_rejected(roles: Any) -> None:
    """roles must be a list of strings; a bare string or anything else is refused."""
    _reject(_hs_verifier(), _hs(roles=roles), "roles claim must be a list of strings")


# ---- B. extract_token ---------------------------------------------------------------------


def test_extract_token_from_query_among_other_params() -> None:
    """?token= is found whatever other query parameters surround it."""
    assert extract_token("/ws?token=abc", None) == "abc"
    assert extract_token("/ws?room=x&token=abc&v=2", None) == "abc"


def test_extract_token_from_bearer_header() -> None:
    """Authorization: Bearer <token> is used when the query has none."""
    assert extract_token("/ws", "Bearer abc.def.ghi") == "abc.def.ghi"
    assert extract_token("/ws?room=x", "Bearer  abc ") == "abc"


def test_extract_token_query_wins_over_header() -> None:
    """When both are present the query token is used (the seed's order)."""
    assert extract_token("/ws?token=fromquery", "Bearer fromheader") == "fromquery"
    assert extract_token("/ws?token=", "Bearer fromheader") == "fromheader"


def test_extract_token_scheme_is_case_insensitive() -> None:
    """'bearer' and 'BEARER' work like 'Bearer'."""
    assert extract_token("/ws", "bearer abc") == "abc"
    assert extract_token("/ws", "BEARER abc") == "abc"


def test_extract_token_missing_is_none() -> None:
    """No query token and no usable Bearer header -> None."""
    assert extract_token("/ws", None) is None
    assert extract_token("/ws?room=x", "") is None
    assert extract_token("/ws", "Basic dXNlcjpwdw==") is None
    assert extract_token("/ws", "Bearer ") is None
    assert extract_token("/ws", "Bearerabc") is None


# ---- C/D. End to end ----------------------------------------------------------------------


async def _refused(node: Node, tok: str | None = None, header: bool = False) -> Any:
    """Connect with ``tok`` (query or Bearer header); assert HTTP 401; return the response."""
    url = ws_url(node, None)
    headers: dict[str, str] = {}
    if tok is not None and header:
        headers["Authorization"] = f"Bearer {tok}"
    elif tok is not None:
        url = f"{url}?token={tok}"
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers, open_timeout=TIMEOUT, close_timeout=1):
            pass
    response = info.value.response
    assert response.status_code == 401
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer")
    if tok:
        assert tok not in response.body.decode("latin-1")
        assert all(tok not in v for v in response.headers.values())
    return response


BAD_TOKENS = {
    "no-token": lambda: None,
    "garbage": lambda: "garbage-token-string",
    "expired": lambda: _hs(exp=int(time.time()) - 3600),
    "wrong-key": lambda: _hs(key=OTHER_SECRET),
    "alg-none": _alg_none,
    "tampered": lambda: _tampered(userId="mallory", roles=["admin"]),
    "unknown-crit": lambda: jwt.encode(_claims(), SECRET, headers={"crit": ["x-f"], "x-f": 1}),
}


@pytest.mark.parametrize("header", [False, True], ids=["query", "bearer"])
@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_bad_token_gets_401_at_upgrade(case: str, header: bool) -> None:
    """Each bad token is refused with HTTP 401 before any session exists, and is counted."""
    async with running_node() as node:
        await _refused(node, BAD_TOKENS[case](), header)
        stats = node.stats()
        assert stats["sessions"] == 0 and stats["transports"] == 0
        assert stats["auth_failures"] == 1


async def test_all_bad_tokens_are_counted_on_one_node(caplog: pytest.LogCaptureFixture) -> None:
    """auth_failures counts every refused upgrade; no session is ever created; the log holds
    one line per refusal with its reason and never a stack trace."""
    caplog.set_level(logging.DEBUG)
    async with running_node() as node:
        for n, make in enumerate(BAD_TOKENS.values(), start=1):
            await _refused(node, make())
            assert node.stats()["sessions"] == 0
            assert node.stats()["auth_failures"] == n
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    refusals = [r for r in caplog.records if "auth" in r.getMessage().lower()]
    assert len(refusals) >= len(BAD_TOKENS), [r.getMessage() for r in caplog.records]


def test_unknown_critical_header_is_rejected() -> None:
    """A `crit` extension fastws does not implement makes the token invalid (RFC 7515)."""
    tok = jwt.encode(_claims(), SECRET, headers={"crit": ["x-f"], "x-f": 1})
    _reject(_hs_verifier(jwt_secret=SECRET), tok, "unsupported critical header")


async def test_hs_rs_confusion_gets_401(rsa_keys: KeyPair) -> None:
    """An RS256 node refuses HS256 tokens keyed with its public key (PEM and JWK) with 401."""
    async with running_node(
        jwt_algorithms="RS256", jwt_public_key_file=rsa_keys.public_file
    ) as node:
        for n, secret in enumerate([rsa_keys.public_pem, rsa_keys.public_jwk.encode()], 1):
            tok = _by_hand({"alg": "HS256", "typ": "JWT"}, _claims(), secret)
            await _refused(node, tok)
            assert node.stats()["sessions"] == 0
            assert node.stats()["auth_failures"] == n
        # An HS256 token with the node's (still configured) HMAC secret is refused too.
        await _refused(node, _hs())
        assert node.stats()["auth_failures"] == 3
        # The control: a real RS256 token is let in.
        good = jwt.encode(_claims(userId="rs-user"), rsa_keys.private_pem, algorithm="RS256")
        async with connect(
            f"{ws_url(node, None)}?token={good}", open_timeout=TIMEOUT, close_timeout=1
        ) as ws:
            hello = await recv_json(ws)
            assert hello["type"] == "connected" and hello["userId"] == "rs-user"


async def test_valid_token_in_bearer_header_is_accepted() -> None:
    """A valid token sent as `Authorization: Bearer` gets `connected`."""
    async with running_node() as node:
        headers = {"Authorization": f"Bearer {token('bob')}"}
        async with connect(
            ws_url(node, None), additional_headers=headers, open_timeout=TIMEOUT, close_timeout=1
        ) as ws:
            hello = await recv_json(ws)
            assert hello["type"] == "connected" and hello["username"] == "bob"
            assert node.stats()["sessions"] == 1
        assert node.stats().get("auth_failures", 0) == 0


async def test_tokens_never_reach_the_log_or_the_401_body(caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG, neither a refused nor an accepted token appears in any fastws log record."""
    caplog.set_level(logging.DEBUG, logger="fastws")
    bad = _hs(key=OTHER_SECRET, userId="eve")
    good = token("carol")
    async with running_node() as node:
        response = await _refused(node, bad)
        assert bad not in response.body.decode("latin-1")
        await _refused(node, bad, header=True)
        async with connect(
            f"{ws_url(node, None)}?token={good}", open_timeout=TIMEOUT, close_timeout=1
        ) as ws:
            assert (await recv_json(ws))["type"] == "connected"
            await send_json(ws, "ping")
            assert (await recv_json(ws))["type"] == "pong"
    messages = [r.getMessage() for r in caplog.records]
    assert any("auth failed" in m for m in messages), messages  # the capture did work
    assert any(m == "connected" for m in messages), messages
    for tok in (bad, good):
        assert tok not in caplog.text
        signature = tok.rsplit(".", 1)[1]
        for record in caplog.records:
            fields = " ".join(str(v) for v in vars(record).values())
            assert tok not in fields and signature not in fields, record


async def test_tokens_never_reach_production_logs_at_debug(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With logs.configure('debug'), stderr (fastws and picows) never shows a token."""
    saved = {
        name: (lg.handlers[:], lg.level, lg.propagate)
        for name in ("fastws", "picows")
        for lg in [logging.getLogger(name)]
    }
    try:
        for fmt in ("text", "json"):
            configure("debug", fmt)
            bad, good = _hs(key=OTHER_SECRET, userId="eve"), token("carol")
            async with running_node() as node:
                await _refused(node, bad)
                await _refused(node, bad, header=True)
                async with connect(
                    f"{ws_url(node, None)}?token={good}", open_timeout=TIMEOUT, close_timeout=1
                ) as ws:
                    assert (await recv_json(ws))["type"] == "connected"
            err = capsys.readouterr().err
            assert "auth" in err and "connected" in err, err  # the logs were written here
            for tok in (bad, good):
                assert tok not in err and tok.rsplit(".", 1)[1] not in err
    finally:
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


@pytest.mark.parametrize("algorithm", ["HS256", "HS384", "HS512"])
def test_the_default_accepts_every_hmac_algorithm_with_the_secret(algorithm: str) -> None:
    """The seed signs its tokens HS512 with the shared secret: accepted by default, as are
    HS256 and HS384 (never ``none``, never a public-key algorithm with the secret)."""
    verifier = Verifier(Settings(), SECRET_64)
    assert verifier.verify(_hs(key=SECRET_64, algorithm=algorithm)).username == "alice"


def test_the_default_still_refuses_none() -> None:
    verifier = Verifier(Settings(), SECRET_64)
    unsigned = jwt.encode(_claims(), None, algorithm="none")
    _reject(verifier, unsigned, "algorithm not allowed")


async def test_a_seed_token_signed_hs512_connects() -> None:
    """The seed's server signs {userId, username, exp} with HS512 and the shared secret: a
    client holding such a token connects to a default fastws."""
    import warnings

    from .utils import SECRET as NODE_SECRET
    from .utils import recv_json, running_node

    with warnings.catch_warnings():  # the tests' secret is short for HS512: the seed's too
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        seed_token = jwt.encode(
            {"userId": "u-1", "username": "alice", "exp": int(time.time()) + 60},
            NODE_SECRET,
            algorithm="HS512",
        )
    async with (
        running_node() as node,
        connect(f"ws://127.0.0.1:{node.port}/ws?token={seed_token}") as ws,
    ):
        hello = await recv_json(ws)
        assert (hello["type"], hello["userId"], hello["username"]) == ("connected", "u-1", "alice")


# ---- F. what a serve process loads ------------------------------------------------------------


def _maps_cryptography(pid: int) -> bool:
    """Whether ``pid`` has cryptography's native library mapped (imported)."""
    with open(f"/proc/{pid}/maps") as fh:
        return "cryptography" in fh.read()


async def _welcomed(port: int, token: str) -> dict[str, Any]:
    async with connect(f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=TIMEOUT) as ws:
        return json.loads(await ws.recv())  # type: ignore[no-any-return]


async def test_an_hmac_serve_process_never_loads_cryptography() -> None:
    """With HMAC algorithms only, ``fastws serve`` keeps cryptography out of the process
    (about 8 MB of RSS each); tokens are checked as before."""
    with server_process() as (proc, port):
        hello = await _welcomed(port, mint(SECRET, "alice"))
        assert hello["type"] == "connected"
        assert not _maps_cryptography(proc.pid)


async def test_a_public_key_serve_process_loads_cryptography_and_verifies(
    rsa_keys: KeyPair,
) -> None:
    """RS256 needs cryptography: it is loaded, and an RS256 token opens a connection."""
    token = jwt.encode(
        {"sub": "alice", "exp": int(time.time()) + 60}, rsa_keys.private_pem, algorithm="RS256"
    )
    with server_process(
        "--jwt-algorithms", "RS256", "--jwt-public-key-file", rsa_keys.public_file
    ) as (proc, port):
        assert (await _welcomed(port, token))["type"] == "connected"
        assert _maps_cryptography(proc.pid)
