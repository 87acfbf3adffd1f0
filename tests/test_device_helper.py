"""The one helper that decides "is this a device array"."""
import numpy as np

from nblstm._device import is_device_array


class RaisesLikeTorchRequiresGrad:
    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")


class HostTensorLikeTorch:
    @property
    def __cuda_array_interface__(self):
        raise AttributeError("Can't get __cuda_array_interface__ on non-CUDA tensor type")


class SimulatorLike:
    __cuda_ndarray__ = True


class WithInterface:
    __cuda_array_interface__ = {"shape": (1,), "typestr": "<f4", "data": (0, False),
                                "version": 3}


def test_recognises_device_arrays_of_every_kind():
    assert is_device_array(WithInterface())
    assert is_device_array(SimulatorLike())
    assert is_device_array(RaisesLikeTorchRequiresGrad())


def test_host_objects_are_not_device_arrays():
    assert not is_device_array(np.ones(3))
    assert not is_device_array(HostTensorLikeTorch())
    assert not is_device_array([1.0])
    assert not is_device_array(WithInterface)
