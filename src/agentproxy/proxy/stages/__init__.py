"""The pipeline's stages, one per module, each built from complete services.

`proxy/assemble.py` writes their order; `proxy/pipeline.py` walks them. A stage refuses a
call by setting `call.refusal` (a policy deny, with `call.decision`) or raising a `Refusal`
(a fault); once a refusal is set, no later stage runs and nothing is forwarded.
"""
