"""Queries of the console's accounts: users, browser sessions and one-time sign-in links.

Only hashes are stored here; the secrets (passwords, cookies, links) and the checks that compare
them live in ``cloud.console.auth``."""

from __future__ import annotations

import time

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cloud.errors import NotFoundError
from cloud.registry.models import ApiToken, ConsoleSession, ConsoleSigninLink, ConsoleUser

# -- users ------------------------------------------------------------------------------------------


def add_user(session: Session, *, username: str, role: str, password_hash: str) -> ConsoleUser:
    """A new console user; a name already taken is a ``ValueError``."""
    if user_by_name(session, username=username) is not None:
        raise ValueError(f"a user called {username!r} exists already")
    user = ConsoleUser(username=username, role=role, password_hash=password_hash)
    session.add(user)
    session.flush()
    return user


def user_by_name(session: Session, *, username: str) -> ConsoleUser | None:
    """The user called ``username``, or None."""
    return session.scalar(select(ConsoleUser).where(ConsoleUser.username == username))


def list_users(session: Session) -> list[ConsoleUser]:
    """Every console user, oldest first, disabled ones included."""
    return list(session.scalars(select(ConsoleUser).order_by(ConsoleUser.id)))


def set_user(
    session: Session,
    *,
    username: str,
    role: str | None = None,
    password_hash: str | None = None,
    disabled: bool | None = None,
) -> ConsoleUser:
    """Change a user's role, password or disabled flag; disabling or a new password or role also ends
    the user's sessions. ``NotFoundError`` if there is no such user."""
    user = user_by_name(session, username=username)
    if user is None:
        raise NotFoundError(f"no user called {username!r}")
    if role is not None:
        user.role = role
    if password_hash is not None:
        user.password_hash = password_hash
    if disabled is not None:
        user.disabled_at = (user.disabled_at or time.time()) if disabled else None
    end_sessions_of(session, principal=f"user:{username}")
    return user


# -- sessions ---------------------------------------------------------------------------------------


def add_session(
    session: Session, *, session_hash: str, principal: str, role: str, csrf_token: str, expires_at: float
) -> ConsoleSession:
    """Record a signed-in browser by its cookie's hash."""
    row = ConsoleSession(
        session_hash=session_hash,
        principal=principal,
        role=role,
        csrf_token=csrf_token,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row


def session_by_hash(session: Session, *, session_hash: str) -> ConsoleSession | None:
    """The browser session whose cookie hashes to ``session_hash``, or None."""
    return session.get(ConsoleSession, session_hash)


def end_session(session: Session, *, session_hash: str) -> None:
    """Forget one browser session (sign-out)."""
    session.execute(delete(ConsoleSession).where(ConsoleSession.session_hash == session_hash))


def end_sessions_of(session: Session, *, principal: str) -> int:
    """Forget every session of ``principal``; how many there were."""
    result = session.execute(delete(ConsoleSession).where(ConsoleSession.principal == principal))
    return int(getattr(result, "rowcount", 0) or 0)


def purge_expired_sessions(session: Session, *, now: float) -> int:
    """Forget expired sessions and links; how many sessions went."""
    result = session.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < now))
    session.execute(delete(ConsoleSigninLink).where(ConsoleSigninLink.expires_at < now))
    return int(getattr(result, "rowcount", 0) or 0)


def principal_active(session: Session, *, principal: str) -> bool:
    """Whether the user or token behind a session may still sign in (not removed, disabled, revoked)."""
    kind, _, name = principal.partition(":")
    if kind == "user":
        user = user_by_name(session, username=name)
        return user is not None and user.disabled_at is None
    if kind == "token":
        token = session.scalar(select(ApiToken).where(ApiToken.name == name))
        return token is not None and token.revoked_at is None
    return kind == "link"


# -- one-time sign-in links -------------------------------------------------------------------------


def add_signin_link(
    session: Session, *, link_hash: str, name: str, role: str, expires_at: float
) -> ConsoleSigninLink:
    """Record a one-time sign-in link by its secret's hash."""
    link = ConsoleSigninLink(link_hash=link_hash, name=name, role=role, expires_at=expires_at)
    session.add(link)
    session.flush()
    return link


def use_signin_link(session: Session, *, link_hash: str, now: float) -> ConsoleSigninLink | None:
    """Mark the link used and return it, or None when unknown, expired or already used. The row is
    locked so two browsers racing on one link cannot both sign in."""
    link = session.scalar(
        select(ConsoleSigninLink).where(ConsoleSigninLink.link_hash == link_hash).with_for_update()
    )
    if link is None or link.used_at is not None or link.expires_at < now:
        return None
    link.used_at = now
    return link
