"""Who may connect to a submission listener: its `allow` list of networks and countries.

Others get 554 and the connection closes before any AUTH is possible, so a password guesser
from elsewhere never gets to guess.
"""

from __future__ import annotations

from yuubin.geo import AccessList
from yuubin.policy.pipeline import Decision, SessionFacts, accept, reject


class AllowList:
    def __init__(self, access: AccessList):
        self.access = access

    async def connect(self, session: SessionFacts) -> Decision:
        ok, why = self.access.allows(session.client)
        if ok:
            return accept("allow", why)
        return reject("allow", why, 554, "5.7.1", f"service refused: [{session.client}] may not submit mail here",
                      close=True)
