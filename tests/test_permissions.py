"""PermissionPolicy, Role and Action: deny- and allow-by-default, strings accepted everywhere."""

from __future__ import annotations

import pytest

from quipu_logging import Action, ConfigError, PermissionDeniedError, PermissionPolicy, Role


class TestAction:
    def test_values_are_the_documented_names(self) -> None:
        """The three actions are emit, query and administer, and compare equal to their names."""
        assert [a.value for a in Action] == ["emit", "query", "administer"]
        assert Action.EMIT == "emit"
        assert str(Action.ADMINISTER) == "administer"
        assert Action("query") is Action.QUERY


class TestRole:
    def test_role_is_a_frozen_named_value(self) -> None:
        """A Role has a name, prints as it, is hashable and immutable."""
        role = Role("auditor")
        assert role.name == "auditor" and str(role) == "auditor"
        assert Role("auditor") == role and len({role, Role("auditor")}) == 1
        with pytest.raises(AttributeError):
            role.name = "x"  # type: ignore[misc]

    @pytest.mark.parametrize("bad", ["", 3, None])
    def test_invalid_names_are_refused(self, bad: object) -> None:
        """An empty or non-string role name is a ConfigError."""
        with pytest.raises(ConfigError):
            Role(bad)  # type: ignore[arg-type]


class TestPermissionPolicy:
    def test_deny_by_default(self) -> None:
        """Without default_allow, a role gets exactly its grants and an unknown role nothing."""
        policy = PermissionPolicy({"app": {"emit"}, Role("ops"): {Action.EMIT, "query", "administer"}})
        assert policy.allows("app", "emit")
        assert not policy.allows("app", Action.QUERY)
        assert policy.allows(Role("ops"), "administer") and policy.allows("ops", Action.QUERY)
        assert not policy.allows("stranger", Action.EMIT)
        assert policy.default_allow is False

    def test_allow_by_default_still_restricts_named_roles(self) -> None:
        """With default_allow, unknown roles may do everything; a named role only its grants."""
        policy = PermissionPolicy({"app": ["emit"]}, default_allow=True)
        assert policy.allows("anyone", Action.ADMINISTER)
        assert policy.allows("app", "emit")
        assert not policy.allows("app", "administer")

    def test_allow_all_and_deny_all(self) -> None:
        """allow_all permits every role every action; deny_all none."""
        for action in Action:
            assert PermissionPolicy.allow_all().allows("x", action)
            assert not PermissionPolicy.deny_all().allows("x", action)

    def test_star_and_single_string_grants(self) -> None:
        """A grant of '*' means every action; a single action name is one action."""
        policy = PermissionPolicy({"root": "*", "app": "emit"})
        assert all(policy.allows("root", a) for a in Action)
        assert policy.grants["app"] == frozenset({Action.EMIT})

    def test_check_raises_naming_role_and_action(self) -> None:
        """check() passes silently when allowed and raises PermissionDeniedError naming both otherwise."""
        policy = PermissionPolicy({"app": {"emit"}})
        policy.check("app", "emit")
        with pytest.raises(PermissionDeniedError, match=r"'app' is not allowed to administer.*only emit"):
            policy.check(Role("app"), Action.ADMINISTER)
        with pytest.raises(PermissionDeniedError, match=r"'guest' is not allowed to query.*by default"):
            policy.check("guest", "query")
        assert issubclass(PermissionDeniedError, PermissionError)

    def test_unknown_action_is_a_config_error(self) -> None:
        """A typo in an action name fails when the policy is built, and when asked."""
        with pytest.raises(ConfigError, match="emti"):
            PermissionPolicy({"app": {"emti"}})
        with pytest.raises(ConfigError, match="delete"):
            PermissionPolicy.allow_all().allows("app", "delete")

    def test_bad_arguments(self) -> None:
        """Non-mapping grants, a bad default_allow and a non-role are refused clearly."""
        with pytest.raises(ConfigError):
            PermissionPolicy(["app"])  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            PermissionPolicy(None, default_allow="yes")  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            PermissionPolicy({"app": 5})  # type: ignore[dict-item]
        with pytest.raises(TypeError):
            PermissionPolicy.deny_all().allows(42, "emit")  # type: ignore[arg-type]

    def test_policies_compare_by_content(self) -> None:
        """Two policies with the same grants and default are equal (and hash alike)."""
        a = PermissionPolicy({"app": {"emit"}})
        b = PermissionPolicy({Role("app"): [Action.EMIT]})
        assert a == b and hash(a) == hash(b)
        assert a != PermissionPolicy({"app": {"emit"}}, default_allow=True)
        assert "app" in repr(a)
