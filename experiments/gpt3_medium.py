"""GPT-3 medium: shapes and recipe from agx.recipes.PUBLISHED."""

from agx.recipes import gpt3_experiment


def config():
    return gpt3_experiment("gpt3_medium")
