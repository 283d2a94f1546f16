import subprocess
import sys


def spawn_agent(agent_type, instance, argv):
    """Start argv as a new instance of agent_type, unless spawnguard would refuse it."""
    gate = subprocess.run(["spawnguard", "gate", agent_type], capture_output=True, text=True)
    if gate.returncode == 1:  # refused, one line why: "no: ceiling 10/10"
        print(f"not starting {instance}: {gate.stdout.strip()}", file=sys.stderr)
        return None
    # 0: it would be admitted now; 2: spawnguard cannot tell (stderr says why): the kernel
    # still decides when the agent starts.
    return subprocess.Popen(
        ["spawnguard", "exec", "--type", agent_type, "--instance", instance, "--", *argv]
    )


if __name__ == "__main__":  # python3 gate.py TYPE INSTANCE CMD...
    agent = spawn_agent(sys.argv[1], sys.argv[2], sys.argv[3:])
    sys.exit(3 if agent is None else agent.wait())
