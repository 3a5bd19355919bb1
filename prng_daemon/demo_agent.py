"""A stand-in pipeline agent for the demo: pauses, then writes its step's result with the SDK."""

from __future__ import annotations

import time

from .sdk import RunContext, write_result


def main() -> None:
    context = RunContext.from_env()
    time.sleep(0.5)  # a real agent would spend hours on the GPU cluster here
    params = {**context.params, "last_step": context.step}
    write_result(
        context.results_dir,
        context,
        {
            "confidence": 0.9,
            "success_criteria_met": True,
            "reasoning": f"demo step {context.step} finished with the given parameters",
            "suggested_params": params,
            "outputs": [f"{context.run_id}.json"],
        },
        {"demo": True, "parameters_used": context.params},
    )


if __name__ == "__main__":
    main()
