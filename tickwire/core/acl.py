"""The least a Redis ACL user needs for each tickwire process: keys, channels and commands.

Every key tickwire writes or reads starts with `tw:` (`KEY_PREFIX`) and so does every pub/sub
channel, so a user can be fenced off the rest of a shared Redis. The commands include those the
scripts run (Redis checks a script's commands against the user that called it), those of the
rare paths (a rollback's fence, a key of another type, a migrating slot) and those that find a
Redis Cluster or Sentinel's primary (CLUSTER SLOTS, ROLE), so that nothing fails later than the
first minutes of a run. Printed by `tickwire acl ROLE`; docs/operations.md, "Redis ACLs".
"""

from __future__ import annotations

from tickwire.core.channels import KEY_PREFIX

#: What every process needs to connect and find the topology.
CONNECT = ("+ping", "+info", "+select", "+role", "+cluster|slots", "+asking")
#: A publisher: the append script (and what it runs), the registry, its marks.
PUBLISH = (
    "+evalsha",
    "+script|load",
    "+sadd",
    "+hdel",
    "+xadd",
    "+xrevrange",
    "+hmget",
    "+hset",
    "+exists",
    "+type",
    "+publish",
    "+spublish",
)

#: Rules by role, after `reset` (no keys, channels or commands).
ROLES: dict[str, tuple[str, ...]] = {
    # `tickwire feed sim|replay`.
    "feed": (*CONNECT, *PUBLISH),
    # `tickwire feed nats|rabbitmq|mqtt`: a publisher, and the message ids it has stored.
    "bridge": (*CONNECT, *PUBLISH, "+hget", "+del", "+zscore", "+zadd", "+zremrangebyrank"),
    # `tickwire bars`: a publisher, the demand servers record, the trades, one lease per bar.
    "bars": (
        *CONNECT,
        *PUBLISH,
        *("+zrangebyscore", "+zremrangebyscore", "+smembers", "+xrange"),
        *("+eval", "+get", "+set", "+pexpire", "+del"),
    ),
    # `tickwire serve`: live pushes, reads, the registry, on-demand bars' demand, and the
    # fence of a channel whose tail Redis lost (a script that writes its meta).
    "server": (
        *CONNECT,
        *("+subscribe", "+ssubscribe", "+xread", "+xrange", "+hmget", "+smembers", "+scard"),
        *("+zadd", "+eval", "+hset"),
    ),
}


def acl_rules(role: str) -> list[str]:
    """The `ACL SETUSER` rules for `role` (see `ROLES`), after `reset`: its keys and channels,
    then its commands. ValueError for an unknown role."""
    try:
        commands = ROLES[role]
    except KeyError:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}") from None
    return ["reset", f"~{KEY_PREFIX}:*", f"&{KEY_PREFIX}:*", *commands]


def acl_hint(error: object) -> str:
    """What to add to a Redis error logged, if an ACL refused something (NOPERM): where to find
    the rules each process needs. Empty otherwise."""
    if "NOPERM" not in str(error):
        return ""
    return (
        " (the Redis user lacks a command, key or channel this process needs: `tickwire acl "
        "ROLE` prints each role's rules; docs/operations.md, Redis ACLs)"
    )
