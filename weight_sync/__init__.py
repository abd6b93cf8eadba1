"""Moving named tensors from a trainer into a rollout engine. Imports nothing of the engine:
a trainer uses the sending halves, the engine the receiving ones."""

from weight_sync.buckets import (DEFAULT_BUCKET_BYTES, Bucket, TensorMeta, make_buckets,
                                 plan_buckets)
from weight_sync.digest import checksum
from weight_sync.collective import WeightUpdateGroup
from weight_sync.zmq_transport import (WeightUpdateError, ZmqWeightReceiver,
                                       ZmqWeightSender, split_address)

__all__ = ["DEFAULT_BUCKET_BYTES", "Bucket", "TensorMeta", "make_buckets", "plan_buckets",
           "checksum", "WeightUpdateGroup", "ZmqWeightSender", "ZmqWeightReceiver",
           "WeightUpdateError", "split_address"]
