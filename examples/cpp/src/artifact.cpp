// dagc::Artifact: manifest.json + sha256 checks + AOTInductor packages. See include/dagc/artifact.h.
#include "dagc/artifact.h"

#include <openssl/evp.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <set>
#include <sstream>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace dagc {

namespace {

constexpr const char* kFormat = "dagc.artifact";
constexpr int kFormatVersion = 3;  // 3 adds accuracy fields this library does not read
constexpr int kOldestVersion = 2;   // the first with task-subset routes
constexpr const char* kManifest = "manifest.json";
constexpr const char* kPackageFormat = "aoti";

std::string Quote(const std::string& s) { return "'" + s + "'"; }

std::string JoinQuoted(const std::vector<std::string>& items) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", " : "") + Quote(items[i]);
  return "[" + out + "]";
}

// The manifest's key of a task subset (dagc.routes.route_key): task names in spec order, joined
// by ','.
std::string RouteKey(const std::vector<std::string>& names) {
  std::string key;
  for (size_t i = 0; i < names.size(); ++i) key += (i ? "," : "") + names[i];
  return key;
}

// First line of an exception's message: LibTorch errors carry backtraces and C++ frames that
// would break the one-line contract.
std::string FirstLine(const std::string& text) {
  std::string line = text.substr(0, text.find('\n'));
  return line.empty() ? std::string("unknown error") : line;
}

std::string Describe(const std::exception& e) {
  if (auto* c10e = dynamic_cast<const c10::Error*>(&e)) return FirstLine(c10e->what_without_backtrace());
  return FirstLine(e.what());
}

bool ReadFile(const fs::path& path, std::string* data, std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = std::error_code(errno, std::generic_category()).message();
    return false;
  }
  data->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  if (in.bad()) {
    *error = "read error";
    return false;
  }
  return true;
}

bool Sha256Hex(const std::string& data, std::string* hex) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), digest, &len, EVP_sha256(), nullptr) != 1) return false;
  static const char* kHex = "0123456789abcdef";
  hex->clear();
  for (unsigned int i = 0; i < len; ++i) {
    hex->push_back(kHex[digest[i] >> 4]);
    hex->push_back(kHex[digest[i] & 15]);
  }
  return true;
}

// The manifest's file names are relative POSIX paths inside the artifact; anything that could
// escape the directory is refused, as dagc.compiler.artifact does.
bool SafeName(const std::string& name) {
  if (name.empty() || name[0] == '/' || name.find('\\') != std::string::npos) return false;
  std::stringstream parts(name);
  std::string part;
  while (std::getline(parts, part, '/')) {
    if (part.empty() || part == "." || part == "..") return false;
  }
  return name.back() != '/';
}

// "2.13.0+cpu" -> (2, 13); false if it does not start with two integers.
bool MajorMinor(const std::string& version, int* major, int* minor) {
  return std::sscanf(version.c_str(), "%d.%d", major, minor) == 2;
}

std::string ShapeText(const at::Tensor& x) {
  std::string s = "(";
  for (int64_t i = 0; i < x.dim(); ++i) s += (i ? ", " : "") + std::to_string(x.size(i));
  return s + (x.dim() == 1 ? ",)" : ")");
}

}  // namespace

struct Artifact::Loaded {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  std::mutex mu;  // one run at a time per package: the container holds one runner
};

Artifact::~Artifact() = default;

Status Artifact::Load(const std::string& dir, std::unique_ptr<Artifact>* out) {
  if (out == nullptr) return Status::Error("Artifact::Load: out must not be null");
  try {
    const fs::path root(dir);
    const fs::path manifest_path = root / kManifest;
    std::string text, error;
    if (!fs::is_directory(root)) return Status::Error(dir + " is not a directory; pass a dagc artifact directory");
    if (!fs::exists(manifest_path)) {
      return Status::Error(dir + " is not a dagc artifact: it has no " + kManifest);
    }
    if (!ReadFile(manifest_path, &text, &error)) {
      return Status::Error("cannot read " + manifest_path.string() + ": " + error);
    }
    json m;
    try {
      m = json::parse(text);
    } catch (const json::exception& e) {
      return Status::Error(manifest_path.string() + " is not valid JSON (" + FirstLine(e.what()) + ")");
    }
    if (!m.is_object() || m.value("format", std::string()) != kFormat) {
      return Status::Error(manifest_path.string() + ": not a dagc artifact manifest (format is not '" + kFormat + "')");
    }
    if (m.contains("format_version") && m["format_version"] == 1) {
      // Version 1 records no task-subset routes, and this library does not recompute them.
      return Status::Error(manifest_path.string() + ": artifact format version 1 records no task-subset routes "
                           "(this library reads versions 2 and 3); recompile it with: dagc compile CHECKPOINT --target "
                           "aoti --out DIR");
    }
    if (!m.contains("format_version") || !m["format_version"].is_number_integer() ||
        m["format_version"].get<int>() < kOldestVersion || m["format_version"].get<int>() > kFormatVersion) {
      return Status::Error(manifest_path.string() + ": artifact format version " +
                           (m.contains("format_version") ? m["format_version"].dump() : std::string("(none)")) +
                           " is not supported (this library reads versions 2 and 3); recompile the checkpoint with a "
                           "matching dagc");
    }

    std::unique_ptr<Artifact> a(new Artifact());
    a->dir_ = dir;
    std::map<std::string, std::string> bytes_of;  // verified contents of the packages
    std::set<std::string> packages;
    const json& models = m.at("models");
    for (auto it = models.begin(); it != models.end(); ++it) {
      if (it.value().at("format").get<std::string>() == kPackageFormat) packages.insert(it.key());
    }
    if (packages.empty()) {
      return Status::Error(dir + " has no AOTInductor packages (it was compiled with --target " +
                           m.at("target").get<std::string>() +
                           "); recompile it with: dagc compile CHECKPOINT --target aoti --out DIR");
    }

    // Every listed file is checked, like dagc.artifact.read_manifest; the packages' bytes
    // are kept so that what is loaded below is exactly what was hashed.
    const json& files = m.at("files");
    if (!files.is_object()) return Status::Error(manifest_path.string() + ": the manifest has no 'files' table");
    for (auto it = files.begin(); it != files.end(); ++it) {
      const std::string& name = it.key();
      if (!SafeName(name) || !it.value().is_object() || !it.value().contains("sha256")) {
        return Status::Error(manifest_path.string() + ": malformed entry for file " + Quote(name));
      }
      std::string data;
      if (!fs::exists(root / name)) {
        return Status::Error("artifact file " + Quote(name) + " listed in manifest.json is missing from " + dir +
                             "; recompile the artifact");
      }
      if (!ReadFile(root / name, &data, &error)) {
        return Status::Error("cannot read artifact file " + Quote(name) + ": " + error);
      }
      std::string hex;
      if (!Sha256Hex(data, &hex)) return Status::Error("OpenSSL could not compute a sha256 of " + Quote(name));
      const json& entry = it.value();
      bool size_ok = !entry.contains("bytes") || entry["bytes"] == data.size();
      if (hex != entry["sha256"].get<std::string>() || !size_ok) {
        return Status::Error("artifact file " + Quote(name) + " in " + dir +
                             " does not match its sha256 in manifest.json (modified or corrupted); "
                             "recompile the artifact");
      }
      if (packages.count(name)) bytes_of[name] = std::move(data);
    }

    for (const json& t : m.at("spec").at("tasks")) a->tasks_.push_back(t.at("name").get<std::string>());
    a->input_names_ = m.at("input").at("names").get<std::vector<std::string>>();
    const json& shape = m.at("input").at("shape");
    if (!shape.is_array() || shape.size() != 4) {
      return Status::Error(manifest_path.string() + ": input shape " + shape.dump() + " is not [batch, C, H, W]");
    }
    for (int i = 0; i < 3; ++i) a->chw_[i] = shape.at(i + 1).get<int64_t>();
    for (const std::string& t : a->tasks_) a->task_input_[t] = m.at("tasks").at(t).at("input").get<std::string>();

    for (const std::string& name : packages) {
      const json& info = models.at(name);
      if (!bytes_of.count(name)) {
        return Status::Error("model " + Quote(name) + " is not listed with a sha256 in the manifest's files; "
                             "recompile the artifact");
      }
      int major = 0, minor = 0;
      std::string version = info.at("torch_version").get<std::string>();
      if (!MajorMinor(version, &major, &minor) || major != TORCH_VERSION_MAJOR || minor != TORCH_VERSION_MINOR) {
        return Status::Error(name + " was compiled with torch " + (version.empty() ? "(unknown)" : version) +
                             " but this program uses LibTorch " + std::to_string(TORCH_VERSION_MAJOR) + "." +
                             std::to_string(TORCH_VERSION_MINOR) +
                             "; recompile the artifact with the torch whose LibTorch this program links");
      }
      ModelInfo mi;
      mi.file = name;
      mi.tasks = info.at("tasks").get<std::vector<std::string>>();
      mi.inputs = info.at("inputs").get<std::vector<std::string>>();
      mi.outputs = info.at("outputs").get<std::vector<std::string>>();
      mi.flops = info.at("flops").get<double>();
      a->models_.push_back(mi);
    }
    // The compiler recorded which packages cover each task subset most cheaply (dagc.routes).
    const json& routes = m.at("routes");
    if (routes.contains(kPackageFormat)) {
      for (auto it = routes.at(kPackageFormat).begin(); it != routes.at(kPackageFormat).end(); ++it) {
        std::vector<std::string> files = it.value().get<std::vector<std::string>>();
        for (const std::string& f : files) {
          if (!packages.count(f)) {
            return Status::Error(manifest_path.string() + ": route " + Quote(it.key()) + " names " + Quote(f) +
                                 ", which is not an AOTInductor package of the artifact; recompile the artifact");
          }
        }
        a->routes_[it.key()] = files;
      }
    }

    for (const ModelInfo& mi : a->models_) {
      // The loader takes a path: give it a private copy of the verified bytes, not the artifact's
      // file, which could change between the check and the load.
      const char* tmpdir = std::getenv("TMPDIR");
      std::string tmpl = std::string(tmpdir && *tmpdir ? tmpdir : "/tmp") + "/dagc-XXXXXX.pt2";
      std::vector<char> path(tmpl.begin(), tmpl.end());
      path.push_back('\0');
      int fd = mkstemps(path.data(), 4);
      if (fd < 0) return Status::Error("cannot create a temporary file in " + tmpl.substr(0, tmpl.rfind('/')));
      const std::string& data = bytes_of[mi.file];
      bool written = ::write(fd, data.data(), data.size()) == static_cast<ssize_t>(data.size());
      ::close(fd);
      auto loaded = std::make_unique<Loaded>();
      std::string load_error;
      if (written) {
        try {
          loaded->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path.data());
        } catch (const std::exception& e) {
          load_error = Describe(e);
        } catch (...) {
          load_error = "unknown error";
        }
      }
      std::remove(path.data());
      if (!written) return Status::Error("cannot write a temporary copy of " + Quote(mi.file) + " (disk full?)");
      if (!load_error.empty()) {
        return Status::Error("LibTorch cannot load " + Quote(mi.file) + " (" + load_error +
                             "); recompile the artifact on this machine with the same torch version");
      }
      a->loaded_.push_back(std::move(loaded));
    }
    *out = std::move(a);
    return Status::Ok();
  } catch (const json::exception& e) {
    return Status::Error(dir + "/manifest.json: malformed manifest (" + FirstLine(e.what()) + "); recompile the artifact");
  } catch (const std::exception& e) {
    return Status::Error("cannot load " + dir + ": " + Describe(e));
  } catch (...) {
    return Status::Error("cannot load " + dir + ": unknown error");
  }
}

Status Artifact::TaskList(const std::vector<std::string>& tasks, std::vector<std::string>* names) const {
  if (tasks.empty()) {
    *names = tasks_;
    return Status::Ok();
  }
  std::vector<std::string> unknown;
  for (const std::string& t : tasks) {
    if (std::find(tasks_.begin(), tasks_.end(), t) == tasks_.end()) unknown.push_back(t);
  }
  if (!unknown.empty()) {
    return Status::Error(std::string("unknown task") + (unknown.size() > 1 ? "s " : " ") + JoinQuoted(unknown) +
                         "; this artifact has tasks " + JoinQuoted(tasks_));
  }
  if (std::set<std::string>(tasks.begin(), tasks.end()).size() != tasks.size()) {
    return Status::Error("tasks " + JoinQuoted(tasks) + " name a task more than once");
  }
  *names = tasks;
  return Status::Ok();
}

Status Artifact::ModelsFor(const std::vector<std::string>& tasks, std::vector<std::string>* files) const {
  std::vector<std::string> names;
  Status s = TaskList(tasks, &names);
  if (!s.ok()) return s;
  const std::set<std::string> want(names.begin(), names.end());
  std::vector<std::string> ordered;  // spec order, as the manifest's route keys
  for (const std::string& t : tasks_) {
    if (want.count(t)) ordered.push_back(t);
  }
  auto found = routes_.find(RouteKey(ordered));
  if (found != routes_.end()) {
    *files = found->second;
    return Status::Ok();
  }
  // Artifacts with more tasks than dagc.routes.ROUTE_MAX_TASKS record one task and all tasks only:
  // another subset runs each of its tasks' recorded routes.
  files->clear();
  for (const std::string& t : ordered) {
    auto single = routes_.find(t);
    if (single == routes_.end()) {
      return Status::Error("no package in " + dir_ + " computes tasks " + JoinQuoted(names) +
                           " (manifest.json records no route for them); recompile the artifact");
    }
    for (const std::string& f : single->second) {
      if (std::find(files->begin(), files->end(), f) == files->end()) files->push_back(f);
    }
  }
  return Status::Ok();
}

Status Artifact::CheckInput(const std::string& label, const at::Tensor& x) const {
  const std::string want = "(batch, " + std::to_string(chw_[0]) + ", " + std::to_string(chw_[1]) + ", " +
                           std::to_string(chw_[2]) + ")";
  if (!x.defined()) return Status::Error(label + " is an undefined tensor; pass a float32 tensor " + want);
  if (x.scalar_type() != at::kFloat) {
    return Status::Error(label + " has dtype " + std::string(c10::toString(x.scalar_type())) +
                         "; this artifact takes float32 " + want + " NCHW, already preprocessed");
  }
  if (!x.device().is_cpu()) return Status::Error(label + " is on " + x.device().str() + "; pass a CPU tensor");
  if (x.dim() != 4 || x.size(1) != chw_[0] || x.size(2) != chw_[1] || x.size(3) != chw_[2] || x.size(0) < 1) {
    return Status::Error(label + " has shape " + ShapeText(x) + "; this artifact takes " + want +
                         " (NCHW, batch >= 1)");
  }
  return Status::Ok();
}

Status Artifact::Run(const at::Tensor& images, const std::vector<std::string>& tasks, std::vector<TaskOutput>* out) {
  if (input_names_.size() != 1) {
    std::string names;
    for (const std::string& n : input_names_) names += (names.empty() ? "" : ", ") + n;
    return Status::Error("this artifact has one input per task (" + names +
                         "); pass a map task name (or input name) -> tensor");
  }
  return Run(std::map<std::string, at::Tensor>{{input_names_[0], images}}, tasks, out);
}

Status Artifact::Run(const std::map<std::string, at::Tensor>& inputs, const std::vector<std::string>& tasks,
                     std::vector<TaskOutput>* out) {
  if (out == nullptr) return Status::Error("Artifact::Run: out must not be null");
  try {
    std::vector<std::string> names;
    Status s = TaskList(tasks, &names);
    if (!s.ok()) return s;
    std::map<std::string, at::Tensor> by_input;
    std::map<std::string, std::string> source;
    for (const auto& [key, value] : inputs) {
      std::string input;
      if (std::find(input_names_.begin(), input_names_.end(), key) != input_names_.end()) {
        input = key;
      } else if (task_input_.count(key)) {
        input = task_input_.at(key);
      } else {
        std::vector<std::string> keys = input_names_;
        if (input_names_.size() > 1) keys.insert(keys.end(), tasks_.begin(), tasks_.end());
        return Status::Error("unknown input " + Quote(key) + "; pass tensors keyed by " + JoinQuoted(keys));
      }
      if (by_input.count(input)) {
        return Status::Error("input " + Quote(input) + " is given twice (as " + Quote(source[input]) + " and " +
                             Quote(key) + ")");
      }
      by_input[input] = value;
      source[input] = key;
    }
    std::map<std::string, at::Tensor> feeds;
    for (const std::string& t : names) {
      const std::string& input = task_input_.at(t);
      if (feeds.count(input)) continue;
      if (!by_input.count(input)) {
        return Status::Error("no images for task " + Quote(t) + ": pass them under " + Quote(input) +
                             (input_names_.size() > 1 ? " (or " + Quote(t) + ")" : std::string()));
      }
      const std::string label = input_names_.size() == 1 ? std::string("the input") : "input " + Quote(source[input]);
      s = CheckInput(label, by_input[input]);
      if (!s.ok()) return s;
      feeds[input] = by_input[input].contiguous();
    }
    int64_t batch = -1;
    for (const auto& [name, x] : feeds) {
      if (batch >= 0 && x.size(0) != batch) {
        return Status::Error("the inputs have different batch sizes; give every task the same batch size");
      }
      batch = x.size(0);
    }
    std::vector<std::string> plan;
    s = ModelsFor(names, &plan);
    if (!s.ok()) return s;
    std::map<std::string, at::Tensor> results;
    for (const std::string& file : plan) {
      size_t k = 0;
      while (models_[k].file != file) ++k;
      const ModelInfo& mi = models_[k];
      std::vector<at::Tensor> args;
      for (const std::string& i : mi.inputs) args.push_back(feeds.at(i));
      std::vector<at::Tensor> got;
      {
        std::lock_guard<std::mutex> lock(loaded_[k]->mu);
        got = loaded_[k]->loader->run(args);
      }
      if (got.size() != mi.outputs.size()) {
        return Status::Error(file + " returned " + std::to_string(got.size()) + " outputs, the manifest lists " +
                             std::to_string(mi.outputs.size()) + "; recompile the artifact");
      }
      for (size_t j = 0; j < got.size(); ++j) results[mi.outputs[j]] = got[j];
    }
    out->clear();
    for (const std::string& t : names) out->push_back(TaskOutput{t, results.at(t)});
    return Status::Ok();
  } catch (const std::exception& e) {
    return Status::Error("running the artifact failed: " + Describe(e));
  } catch (...) {
    return Status::Error("running the artifact failed: unknown error");
  }
}

}  // namespace dagc
