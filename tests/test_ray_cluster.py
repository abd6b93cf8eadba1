"""A group across two Ray nodes (a local two-node cluster: two raylets on this machine)."""

import ray
from ray.cluster_utils import Cluster

from integrations.ray import RolloutGroup
from rollout import SamplingParams
from tests.ray_helpers import ENGINE_OPTIONS, comparable, local_generate

PROMPTS = [[k] + list(range(200 + 11 * k, 240 + 5 * k)) for k in range(1, 5)]
PARAMS = SamplingParams(temperature=0.8, top_p=0.9, seed=21, n=3, max_tokens=12)


def test_spread_group_on_two_nodes_matches_one_local_engine(qwen3_path):
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        group = RolloutGroup(str(qwen3_path), 2, placement="SPREAD", **ENGINE_OPTIONS)
        nodes = ray.get([e.node_id.remote() for e in group.engines])
        assert len(set(nodes)) == 2 and set(nodes) == {n["NodeID"] for n in ray.nodes()}
        got = group.generate(PROMPTS, PARAMS)
        assert comparable(got) == comparable(local_generate(qwen3_path, PROMPTS, PARAMS))
        group.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
