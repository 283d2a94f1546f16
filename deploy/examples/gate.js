const { spawn, spawnSync } = require("node:child_process");

// Start argv as a new instance of type, unless spawnguard would refuse it.
function spawnAgent(type, instance, argv) {
  const gate = spawnSync("spawnguard", ["gate", type], { encoding: "utf8" });
  if (gate.status === 1) { // refused, one line why: "no: ceiling 10/10"
    console.error(`not starting ${instance}: ${gate.stdout.trim()}`);
    return null;
  }
  // 0: it would be admitted now; 2: spawnguard cannot tell (stderr says why): the kernel
  // still decides when the agent starts.
  return spawn("spawnguard", ["exec", "--type", type, "--instance", instance, "--", ...argv],
    { stdio: "inherit" });
}

if (require.main === module) { // node gate.js TYPE INSTANCE CMD...
  const [type, instance, ...argv] = process.argv.slice(2);
  const agent = spawnAgent(type, instance, argv);
  if (agent === null) process.exit(3);
  else agent.on("exit", (code) => process.exit(code ?? 1));
}
