"""schemathesis against the live app's ``/openapi.json``: every operation, every phase
(examples, coverage, fuzzing, stateful) and every check schemathesis has (server errors,
status codes, content types, headers, response and event schemas, schema-valid data accepted
and schema-invalid data refused, unsupported methods...); 0 failures.

Bounded and deterministic: a fixed seed and number of examples per operation, no example
database, and a model context of 64 positions so that every generation is short (the run
takes 10 to 30 s on 2 cores). One limit no schema can state, a prompt's size in tokens, is
excused from one check only (tests/support/schemathesis_hooks.py, loaded by
tests/support/schemathesis.toml, which also keeps no state between runs).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.integration.test_openai_api import serve_cluster
from tests.integration.test_openai_disconnect import kv_sessions

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = 30
SEED = 1


async def test_the_api_answers_as_its_schema_says(tiny_model_dir: Path) -> None:
    async with serve_cluster(
        tiny_model_dir,
        model={"max_context": 64},
        inference={"max_messages": 16, "max_stop_length": 32, "default_max_tokens": 8},
    ) as served:
        command = [
            str(Path(sys.executable).parent / "st"),
            f"--config-file={ROOT / 'tests' / 'support' / 'schemathesis.toml'}",
            "run",
            f"{served.url}/openapi.json",
            "--checks=all",
            # Replaced by the hooks' schema_valid_data_is_accepted (see there).
            "--exclude-checks=positive_data_acceptance",
            f"--max-examples={EXAMPLES}",
            f"--seed={SEED}",
            "--generation-database=none",
            "--workers=1",
            "--no-color",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the hooks module
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 240)
        report = output.decode(errors="replace")
        assert process.returncode == 0, report[-6000:]
        assert "No issues found" in report, report[-6000:]
        # Every operation was called, in every phase.
        assert "5 selected / 5 total" in report and "Tested: 5" in report, report[-3000:]
        # Nothing left behind on the stages.
        assert await kv_sessions(served) == [0, 0]
