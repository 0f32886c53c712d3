// dagc_run: run a compiled dagc artifact (AOTInductor packages) on a .npy batch from C++.
//
//   dagc_run ART_DIR INPUT.npy [--tasks a,b] --out DIR
//   dagc_run ART_DIR TASK=INPUT.npy [TASK=INPUT.npy ...] [--tasks a,b] --out DIR   (one input per task)
//
// INPUT.npy: float32 (batch, C, H, W), already preprocessed as the manifest says. Writes
// DIR/<task>.npy (float32) per task. Any error: one line "dagc_run: error: ..." on stderr, exit 2.
#include <ATen/ops/from_blob.h>

#include <filesystem>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "dagc/artifact.h"
#include "npy.h"

namespace {

constexpr const char* kUsage =
    "usage: dagc_run ART_DIR INPUT.npy | TASK=INPUT.npy ... [--tasks a,b] --out DIR";

int Fail(const std::string& message) {
  std::cerr << "dagc_run: error: " << message << std::endl;
  return 2;
}

std::vector<std::string> Split(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

int Main(int argc, char** argv) {
  std::vector<std::string> positional;
  std::string out_dir, tasks_arg;
  bool tasks_given = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage << std::endl;
      return 0;
    }
    if (arg == "--out" || arg == "--tasks") {
      if (i + 1 >= argc) return Fail(arg + " needs a value; " + kUsage);
      (arg == "--out" ? out_dir : tasks_arg) = argv[++i];
      tasks_given |= arg == "--tasks";
    } else if (arg.rfind("--", 0) == 0) {
      return Fail("unknown option " + arg + "; " + kUsage);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 2) return Fail("give an artifact directory and an input .npy; " + std::string(kUsage));
  if (out_dir.empty()) return Fail("--out DIR is required; " + std::string(kUsage));
  std::vector<std::string> tasks = Split(tasks_arg);
  if (tasks_given && tasks.empty()) return Fail("--tasks is empty; give comma-separated task names");

  std::unique_ptr<dagc::Artifact> artifact;
  dagc::Status s = dagc::Artifact::Load(positional[0], &artifact);
  if (!s.ok()) return Fail(s.message());

  // One batch per input, keyed by the name before '=' (a task or input name), or unkeyed.
  std::map<std::string, dagc::npy::Array> arrays;
  std::map<std::string, at::Tensor> inputs;
  for (size_t i = 1; i < positional.size(); ++i) {
    const std::string& arg = positional[i];
    size_t eq = arg.find('=');
    bool keyed = eq != std::string::npos && !std::filesystem::exists(arg);
    std::string key = keyed ? arg.substr(0, eq) : std::string();
    std::string path = keyed ? arg.substr(eq + 1) : arg;
    if (key.empty()) {
      if (artifact->input_names().size() != 1) {
        return Fail("this artifact has one input per task; give TASK=INPUT.npy for each task you run");
      }
      key = artifact->input_names()[0];
    }
    if (arrays.count(key)) return Fail("input " + key + " is given twice");
    std::string error;
    if (!dagc::npy::Read(path, &arrays[key], &error)) return Fail(error);
    dagc::npy::Array& a = arrays[key];
    inputs[key] = at::from_blob(a.data.data(), a.shape, at::kFloat);
  }

  std::vector<dagc::TaskOutput> outputs;
  s = artifact->Run(inputs, tasks, &outputs);
  if (!s.ok()) return Fail(s.message());
  std::vector<std::string> used;
  artifact->ModelsFor(tasks, &used);

  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return Fail("cannot create " + out_dir + " (" + ec.message() + ")");
  for (const dagc::TaskOutput& o : outputs) {
    at::Tensor v = o.value.contiguous();
    std::vector<int64_t> shape(v.sizes().begin(), v.sizes().end());
    std::string error;
    std::string path = (std::filesystem::path(out_dir) / (o.task + ".npy")).string();
    if (!dagc::npy::Write(path, shape, v.data_ptr<float>(), &error)) return Fail(error);
  }
  std::string models;
  for (const std::string& m : used) models += (models.empty() ? "" : "+") + m;
  std::cout << "ran " << models << "; wrote " << outputs.size() << (outputs.size() == 1 ? " file" : " files") << " to " << out_dir << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(argc, argv);
  } catch (const std::exception& e) {
    std::string what = e.what();
    return Fail(what.substr(0, what.find('\n')));
  } catch (...) {
    return Fail("unexpected error");
  }
}
