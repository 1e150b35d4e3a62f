"""CCC-style streams (Press et al., NeurIPS 2023): schedule, calibration, image composition, setting.

* :mod:`.schedule`: the corruption lists, the walk on a calibration matrix, the pair sequence;
* :mod:`.calibration`: reading calibration matrices (the reference's pickle, safely; .npz; .json);
* :mod:`.compose`: flip + crop, two corruptions, uint8, JPEG, batched on the device;
* :mod:`.setting`: the ``ccc`` setting's stream plan.
"""
