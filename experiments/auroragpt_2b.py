"""AuroraGPT-2B: shapes and recipe from agx.recipes.AURORAGPT."""

from agx.recipes import auroragpt_experiment


def config():
    return auroragpt_experiment("auroragpt_2b")
