"""The shared core: everything two or more method packages need (docs/architecture.md says what each module owns).

Importing it sets one process-wide default before torch loads its OpenMP runtime: idle OpenMP threads sleep
(OMP_WAIT_POLICY=PASSIVE) instead of spinning. With the spinning default, a training run beside one other busy
process on two cores ran about three times slower (issue 13); a user's own setting of the variable wins.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
