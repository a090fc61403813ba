"""Who may do what with an audit pipeline: :class:`Role`, :class:`Action`, :class:`PermissionPolicy`.

A policy maps roles to the actions they may take: ``emit`` (add events),
``query`` (read them back) and ``administer`` (redrive the dead-letter queue,
retention, checkpoints). It is deny-by-default unless built with
``default_allow=True``; a role named in ``grants`` gets exactly its grants
either way, so an allow-by-default policy can still restrict one role.

Roles may be given as :class:`Role` values or as plain strings everywhere:
``policy.allows("app", "emit")`` and ``policy.allows(Role("app"), Action.EMIT)``
are the same question. A policy is immutable once built and safe to share
between threads.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from .errors import ConfigError, PermissionDeniedError

__all__ = ["Action", "PermissionPolicy", "Role", "RoleLike"]


class Action(str, enum.Enum):
    """What a role may do: ``emit`` events, ``query`` them, ``administer`` the pipeline."""

    EMIT = "emit"
    QUERY = "query"
    ADMINISTER = "administer"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Role:
    """A named role, such as ``"app"`` or ``"auditor"``; a plain string works wherever a role is taken.

    Attributes:
        name: the role's name (non-empty).
    """

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a role name must be a non-empty string, got {self.name!r}")

    def __str__(self) -> str:
        return self.name


RoleLike: TypeAlias = Role | str
"""A :class:`Role` or its name."""

_ALL_ACTIONS = frozenset(Action)


def role_name(role: RoleLike) -> str:
    """The name of ``role`` (a :class:`Role` or a string).

    Raises:
        TypeError: ``role`` is neither.
    """
    if type(role) is str:
        return role
    if isinstance(role, Role):
        return role.name
    if isinstance(role, str):
        return str.__str__(role)
    raise TypeError(f"a role must be a Role or a str, got {type(role).__name__}")


def _action(value: Action | str, where: str) -> Action:
    if type(value) is Action:
        return value
    try:
        return Action(value)
    except ValueError:
        raise ConfigError(
            f"{where}: unknown action {value!r}; expected one of emit, query, administer"
        ) from None


def _actions(value: Action | str | Iterable[Action | str], role: str) -> frozenset[Action]:
    where = f"grants for role {role!r}"
    if isinstance(value, str):  # Action is a str too: one action
        if value in ("*", "all"):
            return _ALL_ACTIONS
        return frozenset((_action(value, where),))
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(f"{where}: expected a set of actions, got {value!r}") from None
    return frozenset(_action(a, where) for a in items)


class PermissionPolicy:
    """Which roles may take which actions.

    Args:
        grants: role (a :class:`Role` or its name) -> the actions it may take (a set of
            :class:`Action` values or their names; ``"*"`` means all). ``None`` grants
            nothing explicitly.
        default_allow: what a role not named in ``grants`` may do: everything
            (``True``) or nothing (``False``, the default).

    Raises:
        ConfigError: an unknown action or an invalid role name.

    Example::

        policy = PermissionPolicy({"app": {"emit"}, "ops": {"emit", "query", "administer"}})
        policy.check("app", "emit")          # passes
        policy.check("app", Action.QUERY)    # raises PermissionDeniedError
    """

    __slots__ = ("_default_allow", "_grants", "_open")

    def __init__(
        self,
        grants: Mapping[RoleLike, Action | str | Iterable[Action | str]] | None = None,
        *,
        default_allow: bool = False,
    ) -> None:
        if not isinstance(default_allow, bool):
            raise ConfigError(f"default_allow must be True or False, got {default_allow!r}")
        table: dict[str, frozenset[Action]] = {}
        if grants is not None:
            if not isinstance(grants, Mapping):
                raise ConfigError(f"grants must map roles to sets of actions, got {grants!r}")
            for role, actions in grants.items():
                try:
                    name = role_name(role)
                except TypeError as e:
                    raise ConfigError(str(e)) from None
                if not name:
                    raise ConfigError("a role name must be a non-empty string")
                table[name] = _actions(actions, name)
        self._grants = table
        self._default_allow = default_allow
        # The emit path asks this first: nothing to look up when everyone may do everything.
        self._open = default_allow and all(v == _ALL_ACTIONS for v in table.values())

    @classmethod
    def allow_all(cls) -> PermissionPolicy:
        """A policy under which every role may take every action."""
        return cls(None, default_allow=True)

    @classmethod
    def deny_all(cls) -> PermissionPolicy:
        """A policy under which no role may take any action."""
        return cls(None, default_allow=False)

    @property
    def default_allow(self) -> bool:
        """What roles not named in the grants may do: everything (``True``) or nothing."""
        return self._default_allow

    @property
    def grants(self) -> dict[str, frozenset[Action]]:
        """A copy of the explicit grants, by role name."""
        return dict(self._grants)

    def allows(self, role: RoleLike, action: Action | str) -> bool:
        """Whether ``role`` may take ``action``.

        Args:
            role: a :class:`Role` or its name.
            action: an :class:`Action` or its name.

        Raises:
            ConfigError: ``action`` is not an action (a ``ValueError``).
            TypeError: ``role`` is not a role.
        """
        act = action if type(action) is Action else _action(action, "permission check")
        if self._open:
            return True
        granted = self._grants.get(role_name(role))
        if granted is None:
            return self._default_allow
        return act in granted

    def check(self, role: RoleLike, action: Action | str) -> None:
        """Raises unless ``role`` may take ``action``.

        Raises:
            PermissionDeniedError: the policy does not allow it; the message names the
                role and the action.
        """
        if not self.allows(role, action):
            raise PermissionDeniedError(self.denial(role, action))

    def denial(self, role: RoleLike, action: Action | str) -> str:
        """The message of a :class:`PermissionDeniedError` for ``role`` and ``action``."""
        act = action if type(action) is Action else _action(action, "permission check")
        name = role_name(role)
        granted = self._grants.get(name)
        if granted is None:
            has = "no grants (the policy denies by default)"
        elif granted:
            has = "only " + ", ".join(sorted(a.value for a in granted))
        else:
            has = "no actions"
        return f"role {name!r} is not allowed to {act.value}: it has {has}"

    def __repr__(self) -> str:
        body = {k: sorted(a.value for a in v) for k, v in self._grants.items()}
        return f"PermissionPolicy({body!r}, default_allow={self._default_allow})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PermissionPolicy):
            return NotImplemented
        return self._grants == other._grants and self._default_allow == other._default_allow

    def __hash__(self) -> int:
        return hash((frozenset(self._grants.items()), self._default_allow))
