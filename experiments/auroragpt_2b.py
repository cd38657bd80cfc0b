"""AuroraGPT-2B: shapes and recipe from agx.models.configs.AURORAGPT."""

from agx.models.configs import auroragpt_experiment


def config():
    return auroragpt_experiment("auroragpt_2b")
