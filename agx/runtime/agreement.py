"""One answer from every process of the job, within a deadline.

Processes can see different things: one host's view of a shared file system may be stale. A
decision taken on what each process sees alone then differs between processes, and those that
chose differently wait forever at the next collective. Asking every process first, through JAX's
coordination service (a key-value store that each wait bounds, where a device barrier has no
timeout), lets all of them take the same decision, or stop together when one does not answer.
"""

from __future__ import annotations

import itertools
import json
import time

from agx.errors import RunError

_questions = itertools.count()  # every process asks the same questions in the same order


def every_process_says(question: str, answer, timeout_s: float) -> list:
    """[process 0's answer, process 1's, ...] to `question`; `answer` is this process's (JSON)."""
    import jax

    if jax.process_count() == 1:
        return [answer]
    from jax._src import distributed  # the coordination service's client (the same on both stacks)

    client, key = distributed.global_state.client, f"agx/agreement/{next(_questions)}"
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(answer))
    deadline, answers = time.monotonic() + timeout_s, []
    for process in range(jax.process_count()):
        remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            answers.append(json.loads(client.blocking_key_value_get(f"{key}/{process}", remaining_ms)))
        except Exception:  # noqa: BLE001 - the service's deadline error; its type differs between versions
            raise RunError(f"process {process} did not say within runtime.init_timeout_s={timeout_s:g} s "
                           f"{question} (is its file system hung?); every process stops") from None
    return answers
