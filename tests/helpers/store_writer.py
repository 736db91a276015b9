"""Child process for tests/test_store_durability.py: record decisions until killed.

Prints every seq it has recorded, one per line, flushed only AFTER `record()` returned (i.e.
after the commit): whatever the parent has read is a promise that the row is on disk.

Usage: python tests/helpers/store_writer.py DB_PATH NODE
"""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edge.store import EdgeStore
from shared.protocol import ActionOutcome, DecisionBody, Kind


def main() -> None:
    db_path, node = sys.argv[1], sys.argv[2]
    store = EdgeStore(db_path, node)
    rng = random.Random()
    out = sys.stdout
    i = 0
    while True:
        batch = [
            (
                Kind.DECISION,
                DecisionBody(
                    gpu_index=i % 4,
                    gpu_uuid=f"GPU-{i % 4}",
                    rule="thermal_step_down",
                    action="set_power_limit",
                    value=200.0 + i % 50,
                    outcome=ActionOutcome.APPLIED,
                    reason=f"writer decision {i}",
                    inputs={"i": i, "pad": "x" * rng.randint(0, 2000)},
                    policy_version=1,
                ),
            )
            for _ in range(rng.randint(1, 3))  # batches too: a batch is all or nothing
        ]
        i += 1
        envelopes = store.record(batch)
        out.write("".join(f"{e.seq}\n" for e in envelopes))
        out.flush()


if __name__ == "__main__":
    main()
