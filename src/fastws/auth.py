"""JWT in, ``Principal`` out. The only module that imports jwt (on first use, see ``_jwt``)."""

from __future__ import annotations

import logging
import secrets
import sys
import time
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs

from .config import Settings
from .errors import AuthError, ConfigError

_HMAC = {"HS256", "HS384", "HS512"}
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
log = logging.getLogger("fastws.auth")


def _jwt() -> ModuleType:
    """PyJWT, imported on first use rather than with fastws: it imports ``cryptography``
    whenever that is installed (some 16 MB of RSS per process), which a process that checks
    no token (the supervisor) or only HMAC ones never needs; see ``skip_public_key_crypto``."""
    import jwt

    return jwt


def skip_public_key_crypto(settings: Settings) -> bool:
    """For a ``fastws serve`` process only: when every accepted algorithm is HMAC, hide
    ``cryptography`` from PyJWT (so from the whole process: never call this when embedding
    fastws in an application). Returns whether it did; a no-op once either is imported."""
    if any(a not in _HMAC for a in settings.algorithms):
        return False
    if "cryptography" in sys.modules or "jwt" in sys.modules:
        return False
    sys.modules["cryptography"] = None  # type: ignore[assignment]  # import -> not found
    return True


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection belongs to, taken from its token's claims."""

    user_id: str
    username: str
    roles: tuple[str, ...] = ()
    expires_at: float = 0.0
    rooms: tuple[str, ...] = ()  # the ``rooms`` claim: private rooms (or globs) it may join


class Verifier:
    """Checks tokens with the algorithms, key, audience and issuer pinned by the settings."""

    def __init__(self, settings: Settings, secret: str) -> None:
        algorithms = settings.algorithms
        hmac = [a for a in algorithms if a in _HMAC]
        if hmac and len(hmac) != len(algorithms):
            # Mixing families is how HS/RS confusion starts: refuse the config outright.
            raise ConfigError("jwt_algorithms: do not mix HMAC and public-key algorithms")
        if hmac:
            if not secret:
                raise ConfigError("jwt_secret is required for HMAC algorithms")
            self._key: object = secret
            size = len(secret.encode())
            advised = max(_HMAC_KEY_BYTES[a] for a in hmac)  # RFC 7518 3.2: the hash's size
            if size < 32:
                log.warning("jwt_secret is shorter than 32 bytes; use a longer random secret")
            elif size < advised:
                log.info(
                    "jwt_secret is %d bytes; RFC 7518 advises %d for %s tokens",
                    size,
                    advised,
                    max(hmac, key=_HMAC_KEY_BYTES.__getitem__),
                    extra={"event": "jwt_secret_short"},
                )
            # Said once above; PyJWT would otherwise warn on every single handshake.
            warnings.filterwarnings("ignore", category=_jwt().warnings.InsecureKeyLengthWarning)
        else:
            if not settings.jwt_public_key_file:
                raise ConfigError(f"{algorithms[0]} needs --jwt-public-key-file")
            try:
                with open(settings.jwt_public_key_file, "rb") as fh:
                    self._key = fh.read()
            except OSError as exc:
                raise ConfigError(f"jwt_public_key_file: {exc}") from exc
        self._algorithms = algorithms
        self._audience = settings.jwt_audience or None
        self._issuer = settings.jwt_issuer or None
        self._leeway = settings.jwt_leeway
        required = ["exp"]
        if self._audience:
            required.append("aud")
        if self._issuer:
            required.append("iss")
        self._options = {"require": required, "verify_aud": self._audience is not None}

    def verify(self, token: str) -> Principal:
        """Return the token's principal, or raise ``AuthError`` saying why (never the token)."""
        claims = self._claims(token)
        if "room" in claims:  # minted to join one room: it opens no connection
            raise AuthError("a room token is not a connection token")
        user_id = _user_of(claims)
        username = claims.get("username", user_id)
        if not isinstance(username, str) or not username:
            raise AuthError("username claim must be a non-empty string")
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthError("roles claim must be a list of strings")
        rooms = claims.get("rooms", [])
        if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
            raise AuthError("rooms claim must be a list of strings")
        username = username[:64]
        if username == user_id:
            username = user_id  # one string, not two equal ones, per connection
        return Principal(user_id, username, tuple(roles), float(claims["exp"]), tuple(rooms))

    def verify_room(self, token: str, room: str, user_id: str) -> float:
        """Check a room token (signed like connection tokens, same algorithms, audience and
        issuer) for exactly ``room`` and ``user_id``; its expiry, or ``AuthError``."""
        claims = self._claims(token)
        if claims.get("room") != room:
            raise AuthError("room token is for another room")
        if _user_of(claims) != user_id:
            raise AuthError("room token is for another user")
        return float(claims["exp"])

    def _claims(self, token: str) -> dict[str, Any]:
        jwt = _jwt()
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise AuthError("token not yet valid") from exc
        except jwt.InvalidAlgorithmError as exc:
            raise AuthError("algorithm not allowed") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("bad signature") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"missing claim {exc.claim}") from exc
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise AuthError(str(exc).lower()) from exc
        except jwt.PyJWTError as exc:
            if str(exc).startswith("Unsupported critical extension"):
                # RFC 7515 4.1.11: a `crit` extension we do not implement voids the token.
                raise AuthError("unsupported critical header") from exc
            raise AuthError(f"invalid token: {type(exc).__name__}") from exc
        return claims


def _user_of(claims: dict[str, Any]) -> str:
    user_id = claims.get("userId", claims.get("sub"))
    if not isinstance(user_id, str | int) or isinstance(user_id, bool) or user_id == "":
        raise AuthError("token has no userId or sub claim")
    return str(user_id)


# Browsers cannot set Authorization on a WebSocket and a query string ends up in proxy logs,
# so a browser offers two subprotocols: PROTOCOL, which the server echoes, and
# TOKEN_PROTOCOL_PREFIX + jwt, which it never does (a JWT is base64url and dots: a valid
# subprotocol token, RFC 6455 section 4.1).
PROTOCOL = "fastws.v1"
TOKEN_PROTOCOL_PREFIX = "fastws.token."


def offered_protocols(headers: list[str]) -> list[str]:
    """The subprotocols offered in every ``Sec-WebSocket-Protocol`` header, in order."""
    return [item.strip() for header in headers for item in header.split(",") if item.strip()]


def extract_token(
    path: str, authorization: str | None, protocols: list[str] | None = None
) -> str | None:
    """The token from ``?token=``, ``Authorization: Bearer`` (the seed's order), or else a
    ``fastws.token.<jwt>`` subprotocol among ``protocols``."""
    _, _, query = path.partition("?")
    if query:
        values = parse_qs(query).get("token")
        if values and values[0]:
            return values[0]
    if authorization and authorization[:7].lower() == "bearer ":
        token = authorization[7:].strip()
        if token:
            return token
    for protocol in protocols or ():
        if protocol.startswith(TOKEN_PROTOCOL_PREFIX) and len(protocol) > len(
            TOKEN_PROTOCOL_PREFIX
        ):
            return protocol[len(TOKEN_PROTOCOL_PREFIX) :]
    return None


def mint(
    secret: str,
    user_id: str,
    username: str | None = None,
    roles: tuple[str, ...] = (),
    ttl: float = 3600.0,
    algorithm: str = "HS256",
    extra: dict[str, object] | None = None,
) -> str:
    """A token with the seed's claims (``userId``, ``username``, ``roles``, ``exp``)."""
    claims: dict[str, object] = {
        "userId": user_id,
        "username": username or user_id,
        "roles": list(roles),
        "iat": int(time.time()),
        "exp": int(time.time() + ttl),
    }
    claims.update(extra or {})
    token: str = _jwt().encode(claims, secret, algorithm=algorithm)
    return token


def random_secret() -> str:
    return secrets.token_urlsafe(32)
