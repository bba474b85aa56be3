"""Policy: the rule compiler, CEL conditions, the action index and `decide()`."""

from agentproxy.policy.compiler import PolicySet, compile_policy, policy_issues
from agentproxy.policy.decide import TraceStep, could_allow, decide, decide_next_message

__all__ = [
    "PolicySet",
    "TraceStep",
    "compile_policy",
    "could_allow",
    "decide",
    "decide_next_message",
    "policy_issues",
]
