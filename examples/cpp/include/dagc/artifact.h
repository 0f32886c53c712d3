// dagc C++ embedding: load a compiled dagc artifact (`dagc compile CKPT --target aoti --out ART`) and
// run any subset of its tasks with LibTorch + AOTInductor.
//
// No function of this library throws or aborts: every failure (missing or tampered file, unknown
// task, wrong input shape or dtype, a package that LibTorch cannot load) comes back as a Status
// whose message is one line saying what is wrong and what to do.
#pragma once

#include <ATen/Tensor.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace dagc {

// The outcome of a call: ok, or an error with a one-line message.
class Status {
 public:
  static Status Ok() { return Status(); }
  static Status Error(std::string message) { return Status(std::move(message)); }
  bool ok() const { return !failed_; }
  const std::string& message() const { return message_; }

 private:
  Status() = default;
  explicit Status(std::string message) : failed_(true), message_(std::move(message)) {}
  bool failed_ = false;
  std::string message_;
};

// One task's result: (batch, channels, H, W) for dense tasks, (batch, classes) logits for
// classification; float32 on the CPU.
struct TaskOutput {
  std::string task;
  at::Tensor value;
};

// One AOTInductor package of the artifact, as manifest.json describes it.
struct ModelInfo {
  std::string file;                  // e.g. "model.pt2", "task_depth.pt2"
  std::vector<std::string> tasks;    // tasks it computes
  std::vector<std::string> inputs;   // input names, in the order the package takes them
  std::vector<std::string> outputs;  // task names, in the order the package returns them
  double flops = 0;                  // per sample, from the manifest
};

class Artifact {
 public:
  // Loads the artifact directory `dir`: reads manifest.json (format "dagc.artifact", version 2 or 3;
  // version 1 records no task-subset routes and is refused with the command to recompile), checks
  // the sha256 and size of every file it lists, checks that the packages were compiled with this
  // LibTorch's torch version, reads the packages' routes, and loads every AOTInductor package
  // (`*.pt2`). The bytes that are hashed are the bytes that are loaded. On success `*out` holds
  // the artifact.
  static Status Load(const std::string& dir, std::unique_ptr<Artifact>* out);

  ~Artifact();
  Artifact(const Artifact&) = delete;
  Artifact& operator=(const Artifact&) = delete;

  // Task names, in the spec's order.
  const std::vector<std::string>& tasks() const { return tasks_; }
  // Model input names (one, "image", when all tasks share the input; else one per task).
  const std::vector<std::string>& input_names() const { return input_names_; }
  // The input a task reads.
  const std::string& input_of(const std::string& task) const { return task_input_.at(task); }
  // (C, H, W) of every input.
  std::array<int64_t, 3> input_chw() const { return chw_; }
  const std::vector<ModelInfo>& models() const { return models_; }

  // The package files that Run uses for `tasks` (empty: all tasks): the route the compiler recorded
  // in manifest.json (routes.aoti), the cheapest (FLOPs) way to cover them, so one task runs its
  // per-task package and all tasks the shared one, as the Python runtime
  // (dagc.runtime.Engine.models_for) does. Artifacts with more than 8 tasks record routes for one
  // task and for all tasks only; another subset runs each of its tasks' routes.
  Status ModelsFor(const std::vector<std::string>& tasks, std::vector<std::string>* files) const;

  // Runs `tasks` (empty: all) on a batch of preprocessed images: float32, (batch, C, H, W), on the
  // CPU. Only for artifacts with one input shared by all tasks. `*out` gets one entry per task,
  // in the requested order. Safe to call from several threads.
  Status Run(const at::Tensor& images, const std::vector<std::string>& tasks, std::vector<TaskOutput>* out);

  // The same with one tensor per input, keyed by input name or task name (artifacts whose tasks
  // have their own inputs; all with the same batch size).
  Status Run(const std::map<std::string, at::Tensor>& inputs, const std::vector<std::string>& tasks,
             std::vector<TaskOutput>* out);

 private:
  struct Loaded;
  Artifact() = default;
  Status TaskList(const std::vector<std::string>& tasks, std::vector<std::string>* names) const;
  Status CheckInput(const std::string& label, const at::Tensor& x) const;

  std::string dir_;
  std::vector<std::string> tasks_;
  std::vector<std::string> input_names_;
  std::map<std::string, std::string> task_input_;
  std::array<int64_t, 3> chw_{};
  std::vector<ModelInfo> models_;
  std::map<std::string, std::vector<std::string>> routes_;  // "t1,t2" (spec order) -> package files
  std::vector<std::unique_ptr<Loaded>> loaded_;  // parallel to models_
};

}  // namespace dagc
