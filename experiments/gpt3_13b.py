"""GPT-3 13b: shapes and recipe from agx.models.configs.PUBLISHED."""

from agx.models.configs import gpt3_experiment


def config():
    return gpt3_experiment("gpt3_13b")
