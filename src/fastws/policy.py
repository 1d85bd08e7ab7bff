"""Who may join, post in and see the presence of which room: every rule decided here.

No I/O: the node asks, the policy answers from the connection's ``Principal`` (its token's
claims) and the settings. The same rules run on every broker, since they are applied on the
node before anything reaches one.

- **Open by default** (the seed's behaviour): any authenticated user joins any room.
- **Private rooms** (``private_rooms``: comma-separated globs, e.g. ``private:*``): joining
  needs the room, or a glob matching it, in the token's ``rooms`` claim, or a room token in
  ``join_room`` (checked by ``auth.Verifier.verify_room``), or a yes from the join hook.
- **Direct rooms** (``direct_rooms``: comma-separated prefixes, e.g. ``dm:``): a room named
  ``<prefix><user>:<user>`` is private to those two users; no token change needed.
- **Roles** (``room_post``, ``room_presence``: ``pattern=who|who;pattern=who``): in rooms
  matching a pattern only those listed may post (and type) or see presence; ``who`` is
  ``role:<name>`` or ``user:<id>``. The first matching pattern decides.

Names are compared exactly (no case folding, no Unicode normalization): a name that differs
in any code point is another room, and the patterns decide for it on its own.
"""

from __future__ import annotations

import fnmatch
from typing import NamedTuple

from .auth import Principal
from .config import Settings
from .errors import ConfigError

#: The answer to a refused request, the same whether the room exists or not.
FORBIDDEN = "You are not allowed to do that in this room"


class Rule(NamedTuple):
    pattern: str
    who: frozenset[str]  # "role:<name>" / "user:<id>"


def _patterns(raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _rules(field: str, raw: str) -> tuple[Rule, ...]:
    rules = []
    for part in (p.strip() for p in raw.split(";")):
        if not part:
            continue
        pattern, sep, who = part.partition("=")
        names = frozenset(w.strip() for w in who.split("|") if w.strip())
        if not sep or not pattern.strip() or not names:
            raise ConfigError(f"{field}: expected pattern=who|who;..., got {part!r}")
        bad = [w for w in names if not w.startswith(("role:", "user:"))]
        if bad:
            raise ConfigError(f"{field}: {bad[0]!r} is neither role:<name> nor user:<id>")
        rules.append(Rule(pattern.strip(), names))
    return tuple(rules)


def _allowed(rules: tuple[Rule, ...], who: Principal, room: str) -> bool:
    for rule in rules:
        if fnmatch.fnmatchcase(room, rule.pattern):
            return f"user:{who.user_id}" in rule.who or any(
                f"role:{role}" in rule.who for role in who.roles
            )
    return True  # no rule for the room: everyone


class Policy:
    def __init__(self, settings: Settings) -> None:
        self.private = _patterns(settings.private_rooms)
        self.direct = _patterns(settings.direct_rooms)
        self.post_rules = _rules("room_post", settings.room_post)
        self.presence_rules = _rules("room_presence", settings.room_presence)

    @property
    def open(self) -> bool:
        """No rule at all: the seed's behaviour, every room open to every user."""
        return not (self.private or self.direct or self.post_rules or self.presence_rules)

    def describe(self) -> str:
        """One line for the startup banner."""
        if self.open:
            return "rooms: open (any authenticated user may join any room)"
        parts = []
        if self.private:
            parts.append("private " + ",".join(self.private))
        if self.direct:
            parts.append("direct " + ",".join(f"{p}<user>:<user>" for p in self.direct))
        if self.post_rules:
            parts.append(f"{len(self.post_rules)} post rule(s)")
        if self.presence_rules:
            parts.append(f"{len(self.presence_rules)} presence rule(s)")
        return "rooms: " + "; ".join(parts)

    # ---- joining ------------------------------------------------------------------------------

    def direct_members(self, room: str) -> tuple[str, str] | None:
        """The two users of a direct room, or None if ``room`` is not one."""
        for prefix in self.direct:
            if room.startswith(prefix):
                first, sep, second = room[len(prefix) :].partition(":")
                if sep and first and second and ":" not in second:
                    return first, second
                return ("", "")  # under a direct prefix but malformed: nobody's
        return None

    def is_private(self, room: str) -> bool:
        return self.direct_members(room) is not None or any(
            fnmatch.fnmatchcase(room, p) for p in self.private
        )

    def claims(self, who: Principal, room: str) -> bool:
        """Whether the token's ``rooms`` claim names the room (exactly, or by a glob)."""
        return any(room == grant or fnmatch.fnmatchcase(room, grant) for grant in who.rooms)

    def may_join(self, who: Principal, room: str) -> bool | None:
        """True: allowed from the rules and the token alone; False: refused for good (a
        direct room of others); None: a private room only a room token or the hook can open."""
        pair = self.direct_members(room)
        if pair is not None:
            return bool(who.user_id) and who.user_id in pair
        if not any(fnmatch.fnmatchcase(room, p) for p in self.private):
            return True
        return True if self.claims(who, room) else None

    # ---- inside -------------------------------------------------------------------------------

    def may_post(self, who: Principal, room: str) -> bool:
        return _allowed(self.post_rules, who, room)

    def may_see_presence(self, who: Principal, room: str) -> bool:
        return _allowed(self.presence_rules, who, room)
