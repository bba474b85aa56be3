"""Who may decide an approval: a listed approver, never the requester (four-eyes)."""

from __future__ import annotations

from agentproxy.approvals.lifecycle import Approval
from agentproxy.config.model import names_principal
from agentproxy.core import Principal
from agentproxy.errors import Denied


def is_listed(principal: Principal, approvers: tuple[str, ...]) -> bool:
    """`role:NAME` matches a role, `user:ID` and a bare `ID` the approver's own id, each
    only from the issuer it is bound to (`…@ISSUER`), if bound (`config.model.PrincipalRef`)."""
    return names_principal(approvers, principal)


def check_approver(principal: Principal, approval: Approval) -> None:
    """Raises Denied unless `principal` may approve or deny `approval`.

    The approver acts as themselves: a delegated token (an agent acting for someone) never
    approves. Nobody approves a call they asked for, made, or that is made on their behalf:
    not the requesting agent, not the user it acts for, not an earlier actor in its chain.
    """
    if principal.acting_for is not None or principal.chain:
        raise Denied("approvals are decided with the approver's own token, not a delegated one")
    involved = {approval.agent, *approval.chain}
    if approval.user is not None:
        involved.add(approval.user)
    if principal.agent in involved:
        raise Denied("four-eyes: the requester, its user and its delegation chain cannot approve")
    if not is_listed(principal, approval.approvers):
        raise Denied(
            f"not an approver for this request (approvers: {', '.join(approval.approvers)})"
        )
