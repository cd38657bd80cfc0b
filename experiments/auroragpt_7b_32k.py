"""AuroraGPT-7B at 32,768 positions (Llama-class long context): 128 sequences a step, each split over
8 devices (mesh.context; agx.parallel.context). `python -m agx.plan --experiment auroragpt_7b_32k
--system aurora` shows what it takes."""

from agx.recipes import auroragpt_experiment


def config():
    return auroragpt_experiment("auroragpt_7b", seq_len=32768, context=8)
