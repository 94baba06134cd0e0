// Smoke tests of the `intfa` command-line tool (built as INTFA_CLI_PATH): info, demo, accuracy
// with --json (parsed with a small JSON reader), and the usage errors.
#include <gtest/gtest.h>

#ifdef INTFA_CLI_PATH

#include <sys/wait.h>
#include <unistd.h>

#include <cctype>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "intfa/intfa.h"

namespace intfa::testing {
namespace {

struct CliResult {
  int status = -1;     // exit status, or -1 if the process did not exit normally
  std::string output;  // stdout and stderr together
};

CliResult run_cli(const std::string& args) {
  const std::string cmd = std::string("'") + INTFA_CLI_PATH + "' " + args + " 2>&1";
  CliResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// A minimal JSON reader (objects, arrays, strings with simple escapes, numbers, literals):
// enough to check the structure of the CLI's --json output.
struct Json {
  enum Type { null, boolean, number, string, array, object } type = null;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> items;
  std::map<std::string, Json> fields;
  const Json* get(const std::string& k) const {
    auto it = fields.find(k);
    return it == fields.end() ? nullptr : &it->second;
  }
};

class JsonReader {
 public:
  explicit JsonReader(const std::string& s) : s_(s) {}
  bool parse(Json* out) {
    if (!value(out)) return false;
    ws();
    return i_ == s_.size();
  }
  size_t pos() const { return i_; }

 private:
  void ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool lit(const char* w) {
    const std::string t(w);
    if (s_.compare(i_, t.size(), t) != 0) return false;
    i_ += t.size();
    return true;
  }
  bool string(std::string* out) {
    if (s_[i_] != '"') return false;
    ++i_;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        if (++i_ >= s_.size()) return false;
        const char c = s_[i_];
        out->push_back(c == 'n' ? '\n' : c == 't' ? '\t' : c);
      } else {
        out->push_back(s_[i_]);
      }
      ++i_;
    }
    if (i_ >= s_.size()) return false;
    ++i_;
    return true;
  }
  bool value(Json* v) {
    ws();
    if (i_ >= s_.size()) return false;
    const char c = s_[i_];
    if (c == '{') {
      v->type = Json::object;
      ++i_;
      ws();
      if (i_ < s_.size() && s_[i_] == '}') return ++i_, true;
      while (true) {
        ws();
        std::string key;
        if (i_ >= s_.size() || !string(&key)) return false;
        ws();
        if (i_ >= s_.size() || s_[i_++] != ':') return false;
        Json item;
        if (!value(&item)) return false;
        v->fields[key] = item;
        ws();
        if (i_ >= s_.size()) return false;
        if (s_[i_] == ',') { ++i_; continue; }
        if (s_[i_] == '}') return ++i_, true;
        return false;
      }
    }
    if (c == '[') {
      v->type = Json::array;
      ++i_;
      ws();
      if (i_ < s_.size() && s_[i_] == ']') return ++i_, true;
      while (true) {
        Json item;
        if (!value(&item)) return false;
        v->items.push_back(item);
        ws();
        if (i_ >= s_.size()) return false;
        if (s_[i_] == ',') { ++i_; continue; }
        if (s_[i_] == ']') return ++i_, true;
        return false;
      }
    }
    if (c == '"') {
      v->type = Json::string;
      return string(&v->str);
    }
    if (lit("true")) { v->type = Json::boolean; v->b = true; return true; }
    if (lit("false")) { v->type = Json::boolean; return true; }
    if (lit("null")) return true;
    // Number (JSON has no nan/inf literals: strtod would accept them, so check the first char).
    if (c != '-' && !std::isdigit(static_cast<unsigned char>(c))) return false;
    const char* start = s_.c_str() + i_;
    char* end = nullptr;
    v->num = std::strtod(start, &end);
    if (end == start || !std::isfinite(v->num)) return false;
    v->type = Json::number;
    i_ += end - start;
    return true;
  }
  const std::string& s_;
  size_t i_ = 0;
};

TEST(JsonReader, ParsesAndRejects) {
  Json j;
  std::string good = R"({"a": [1, -2.5e-3, "x\"y"], "b": {"c": true, "d": null}})";
  ASSERT_TRUE(JsonReader(good).parse(&j));
  ASSERT_EQ(j.get("a")->items.size(), 3u);
  EXPECT_EQ(j.get("a")->items[1].num, -2.5e-3);
  EXPECT_EQ(j.get("a")->items[2].str, "x\"y");
  EXPECT_TRUE(j.get("b")->get("c")->b);
  for (std::string bad : {R"({"a": 1,})", R"({"a": nan})", R"([1 2])", R"({"a": 1} x)", R"({"a")"}) {
    Json k;
    EXPECT_FALSE(JsonReader(bad).parse(&k)) << bad;
  }
}

TEST(Cli, Info) {
  CliResult r = run_cli("info");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("intfa"), std::string::npos) << r.output;
  bool gpu_line = false;
  std::istringstream lines(r.output);
  for (std::string line; std::getline(lines, line);) gpu_line |= line.find("GPU") != std::string::npos;
  EXPECT_TRUE(gpu_line) << r.output;
}

TEST(Cli, DemoOnCpu) {
  CliResult r = run_cli("demo --device cpu");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("rel_l2"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("ms"), std::string::npos) << r.output;
  // The number after "rel_l2" is a sane accuracy for the default (accurate) scheme.
  const size_t at = r.output.find("rel_l2");
  if (at != std::string::npos) {
    const char* p = r.output.c_str() + at + 6;
    while (*p == ' ' || *p == ':' || *p == '=') ++p;
    char* end = nullptr;
    const double v = std::strtod(p, &end);
    if (end != p) {
      EXPECT_TRUE(std::isfinite(v)) << r.output;
      EXPECT_LT(v, 5e-2) << r.output;
    }
  }
}

// Runs `intfa <args> --json FILE` (a file of its own per call) and reads FILE back: *r is the
// run, *text the file, and the result what it parses to (null, with a failure reported, when
// it is missing or invalid).
Json run_json(const std::string& args, CliResult* r, std::string* text) {
  static int calls = 0;
  const std::string file = ::testing::TempDir() + "intfa_cli_" + std::to_string(::getpid()) + "_" +
                           std::to_string(++calls) + ".json";
  std::remove(file.c_str());
  *r = run_cli(args + " --json '" + file + "'");
  Json j;
  std::ifstream f(file);
  if (!f.good()) {
    ADD_FAILURE() << "no JSON file written at " << file << "\n" << r->output;
    return j;
  }
  std::stringstream ss;
  ss << f.rdbuf();
  *text = ss.str();
  JsonReader reader(*text);
  if (!reader.parse(&j)) {
    ADD_FAILURE() << "invalid JSON near offset " << reader.pos() << ":\n" << *text;
    j = Json();
  }
  std::remove(file.c_str());
  return j;
}

TEST(Cli, AccuracyJson) {
  CliResult r;
  std::string text;
  Json j = run_json("accuracy --device cpu --seq 64 --dist normal --scheme paper,accurate --hdim 64 "
                    "--heads 2", &r, &text);
  ASSERT_EQ(r.status, 0) << r.output;
  ASSERT_EQ(j.type, Json::object) << text;
  const Json* rows = j.get("rows");
  ASSERT_TRUE(rows && rows->type == Json::array) << text;
  ASSERT_EQ(rows->items.size(), 2u) << text;
  std::set<std::string> schemes;
  for (const Json& row : rows->items) {
    ASSERT_EQ(row.type, Json::object);
    for (const char* key : {"scheme", "dist", "seq", "hdim", "rel_l2"})
      ASSERT_NE(row.get(key), nullptr) << "row lacks \"" << key << "\":\n" << text;
    ASSERT_EQ(row.get("scheme")->type, Json::string);
    schemes.insert(row.get("scheme")->str);
    EXPECT_EQ(row.get("dist")->str, "normal");
    EXPECT_EQ(row.get("seq")->num, 64);
    EXPECT_EQ(row.get("hdim")->num, 64);
    ASSERT_EQ(row.get("rel_l2")->type, Json::number);
    EXPECT_GT(row.get("rel_l2")->num, 0);
    EXPECT_LT(row.get("rel_l2")->num, 5e-2);
  }
  EXPECT_EQ(schemes, (std::set<std::string>{"paper", "accurate"}));
}

// Issue 2's acceptance command at N = 4096 (about a minute on 2 cores): the figures the float64
// simulations of the scheme definitions gave (design.md §1.2).
TEST(Cli, AccuracyTargetsAt4096) {
  CliResult r;
  std::string text;
  Json j = run_json("accuracy --device cpu --seq 4096 --dist normal,uniform,llm --scheme paper,accurate,half",
                    &r, &text);
  ASSERT_EQ(r.status, 0) << r.output;
  ASSERT_NE(j.get("rows"), nullptr) << text;
  std::map<std::string, double> l2;  // "scheme/dist" -> rel_l2
  for (const Json& row : j.get("rows")->items)
    l2[row.get("scheme")->str + "/" + row.get("dist")->str] = row.get("rel_l2")->num;
  ASSERT_EQ(l2.size(), 9u) << text;
  EXPECT_NEAR(l2["paper/normal"], 3.4e-2, 0.15 * 3.4e-2);
  EXPECT_NEAR(l2["paper/uniform"], 1.0e-4, 0.15 * 1.0e-4);
  EXPECT_LE(l2["accurate/normal"], 1.6e-2);
  EXPECT_LE(l2["accurate/uniform"], 1.0e-4);
  EXPECT_LT(l2["accurate/llm"], l2["paper/llm"]);
  EXPECT_LE(l2["accurate/llm"], 4.5e-2);
  EXPECT_LT(l2["half/normal"], l2["accurate/normal"]);
}

// The one row of an accuracy --json run (null when there is not exactly one).
const Json* only_row(const Json& j) {
  const Json* rows = j.get("rows");
  return rows && rows->items.size() == 1 ? &rows->items[0] : nullptr;
}

// The rel_l2 of the one row of an accuracy --json run of `args` (NaN, with a failure reported,
// when there is no such row); the row's `field` must be the numbers `pair` (none: no field) and
// the run's output contain `note`.
double row_error(const std::string& args, const char* field, const std::vector<double>& pair,
                 const std::string& note = "") {
  CliResult r;
  std::string text;
  Json j = run_json(args, &r, &text);
  EXPECT_EQ(r.status, 0) << args << "\n" << r.output;
  EXPECT_NE(r.output.find(note), std::string::npos) << r.output;
  const Json* row = only_row(j);
  if (!row || !row->get("rel_l2")) {
    ADD_FAILURE() << args << ": no row with rel_l2\n" << text;
    return NAN;
  }
  const Json* f = row->get(field);
  if (pair.empty()) {
    EXPECT_EQ(f, nullptr) << "no option, no field " << field << ":\n" << text;
  } else if (!f || f->type != Json::array || f->items.size() != pair.size()) {
    ADD_FAILURE() << "expected the field " << field << " as an array of " << pair.size() << ":\n" << text;
  } else {
    for (size_t i = 0; i < pair.size(); ++i) EXPECT_EQ(f->items[i].num, pair[i]) << text;
  }
  return row->get("rel_l2")->num;
}

// --window L,R reaches intfa and the float64 reference alike (the error stays the scheme's
// against a reference under the same mask), changes what is computed (another error than the
// unwindowed run's on the same inputs), and shows in the header and the JSON row.
TEST(Cli, AccuracyWithWindow) {
  const std::string args = "accuracy --device cpu --seq 200 --dist normal --scheme accurate --hdim 64 --heads 2 "
                           "--causal 1";
  const double err = row_error(args + " --window 15,0", "window", {15, 0}, "causal 1, window (15, 0),");
  EXPECT_GT(err, 0);
  EXPECT_LT(err, 5e-2) << "intfa and the reference ran under different masks?";
  EXPECT_NE(row_error(args, "window", {}), err) << "the window changed nothing";
}

// --sinks reaches intfa and the float64 reference alike (the error stays the scheme's, which it
// would not if only one side had them: causal rows of few keys are mostly sink), changes what is
// computed (another error than the run without sinks on the same inputs), and shows in the
// header and the JSON row (the logits' range); a bare --sinks is --sinks 1, --sinks 0 the run
// without. demo takes it too.
TEST(Cli, AccuracyWithSinks) {
  const std::string args = "accuracy --device cpu --seq 200 --dist normal --scheme accurate --hdim 64 --heads 4 "
                           "--heads-kv 2 --causal 1 --window 63,0";
  const double err = row_error(args + " --sinks", "sinks", {0, 8},
                               "causal 1, window (63, 0), sinks U[0, 8) per head,");
  EXPECT_GT(err, 0);
  EXPECT_LT(err, 5e-2) << "intfa and the reference ran with different sinks?";
  const double plain = row_error(args, "sinks", {});
  EXPECT_NE(plain, err) << "the sinks changed nothing";
  EXPECT_EQ(row_error(args + " --sinks 0", "sinks", {}), plain);
  CliResult demo = run_cli("demo --device cpu --seq 256 --heads 2 --sinks");
  EXPECT_EQ(demo.status, 0) << demo.output;
  EXPECT_NE(demo.output.find("sinks U[0, 8) per head"), std::string::npos) << demo.output;
}

// --softcap X reaches intfa and the float64 reference alike (the error stays the scheme's, which
// it would not if one side ran uncapped: scores of several units under a cap of 1), changes what
// is computed, and shows in the header and the JSON row; --softcap 0 is the run without.
TEST(Cli, AccuracyWithSoftcap) {
  const std::string args = "accuracy --device cpu --seq 200 --dist llm --scheme accurate --hdim 64 --heads 4 "
                           "--heads-kv 2 --causal 1";
  CliResult r;
  std::string text;
  Json j = run_json(args + " --softcap 1", &r, &text);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("causal 1, softcap 1,"), std::string::npos) << r.output;
  const Json* row = only_row(j);
  ASSERT_TRUE(row && row->get("rel_l2") && row->get("softcap")) << text;
  EXPECT_EQ(row->get("softcap")->num, 1.0) << text;
  const double err = row->get("rel_l2")->num;
  EXPECT_GT(err, 0);
  EXPECT_LT(err, 5e-2) << "intfa and the reference ran with different caps?";
  const double plain = row_error(args, "softcap", {});
  EXPECT_NE(plain, err) << "the cap changed nothing";
  EXPECT_EQ(row_error(args + " --softcap 0", "softcap", {}), plain);
}

// A usage error: exit status 2 and a message that names the option.
void expect_usage_error(const std::string& args, const std::string& option) {
  CliResult r = run_cli(args);
  EXPECT_EQ(r.status, 2) << args << "\n" << r.output;
  EXPECT_NE(r.output.find(option), std::string::npos) << args << "\n" << r.output;
}

TEST(Cli, BadSeqNamesTheOption) {
  expect_usage_error("accuracy --seq -5", "--seq");
  expect_usage_error("accuracy --device cpu --seq 0", "--seq");
  expect_usage_error("accuracy --device cpu --seq abc", "--seq");
}

TEST(Cli, BadSchemeNamesTheOption) {
  CliResult r = run_cli("accuracy --scheme bogus");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--scheme"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("bogus"), std::string::npos) << r.output;
}

TEST(Cli, BadDistNamesTheOption) {
  CliResult r = run_cli("accuracy --dist bogus");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_EQ(r.status, 2) << r.output;
  EXPECT_NE(r.output.find("--dist"), std::string::npos) << r.output;
}

TEST(Cli, UnknownOptionAndMissingValue) {
  CliResult r = run_cli("accuracy --device cpu --nosuchoption 3");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--nosuchoption"), std::string::npos) << r.output;
  r = run_cli("accuracy --device cpu --seq");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("--seq"), std::string::npos) << r.output;
}

TEST(Cli, UnknownCommand) {
  CliResult r = run_cli("nosuchcommand");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("nosuchcommand"), std::string::npos) << r.output;
  r = run_cli("");
  EXPECT_NE(r.status, 0) << r.output;
}

TEST(Cli, BenchNeedsGpu) {
  if (device_info(0).present) GTEST_SKIP() << "a GPU is present";
  CliResult r = run_cli("bench");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("GPU"), std::string::npos) << r.output;
}

// Bench arguments are checked before the GPU is looked for: the same usage errors everywhere.
TEST(Cli, BenchArgumentErrorsNameTheOption) {
  expect_usage_error("bench --varlen 100,200 --seq 512", "--varlen");
  expect_usage_error("bench --varlen 100,0", "--varlen");
  expect_usage_error("bench --heads 32 --heads-kv 5", "--heads-kv");
  expect_usage_error("bench --page 100 --seq 1000", "--page: expected a multiple of 16");
  expect_usage_error("bench --page 256 --seq 1000", "--page: must divide every --seq (1000)");
  expect_usage_error("bench --page 256 --varlen 256,512", "--page: paged KV takes dense queries");
  expect_usage_error("bench --page 256 --seq 512 --page-order random", "--page-order: expected shuffled or ordered");
  expect_usage_error("bench --seq 512 --table-pages 8", "--table-pages: needs --page");
  expect_usage_error("bench --page 128 --seq 512 --table-pages 8", "--table-pages: needs --seqused 1 or 2");
  expect_usage_error("bench --page 128 --seq 1024 --seqused 1 --table-pages 4",
                     "--table-pages: expected at least --seq / --page = 8 pages, got 4");
  expect_usage_error("bench --graph -1", "--graph: expected integers in [0, 1000]");
  expect_usage_error("bench --graph 20x", "--graph: expected integers in [0, 1000]");
}

// --window takes LEFT,RIGHT, each -1 or >= 0, and RIGHT at most 0 where a run is causal; bench
// says so before it looks for a GPU (its --causal defaults to 0,1).
TEST(Cli, BadWindowNamesTheOption) {
  for (const std::string bad : {"5", "a,b", "1,2,3", "-2,0", ",0", "5,", "99999999999,0"})
    expect_usage_error("accuracy --device cpu --seq 64 --window " + bad,
                       "--window: expected LEFT,RIGHT, two integers each -1 (no edge) or >= 0, e.g. 255,0, "
                       "got '" + bad + "'");
  const std::string causal = "--window: causal is RIGHT = 0, so RIGHT must be -1 or 0 when --causal includes 1, "
                             "got '5,3'";
  expect_usage_error("accuracy --device cpu --seq 64 --causal 1 --window 5,3", causal);
  expect_usage_error("bench --window 5,3", causal);
  expect_usage_error("bench --causal 1 --window x", "--window: expected LEFT,RIGHT");
}

// --sinks takes 0 or 1 (or nothing: 1), on every command that has it, bench before it looks
// for a GPU.
TEST(Cli, BadSinksNamesTheOption) {
  for (const std::string bad : {"2", "-1", "yes"})
    for (const std::string cmd : {"accuracy --device cpu --seq 64", "bench", "demo --device cpu"})
      expect_usage_error(cmd + " --sinks " + bad, "--sinks: expected integers in [0, 1] separated by commas, got '" +
                                                      bad + "'");
  expect_usage_error("bench --sinks 0,1", "--sinks: expected one integer");
}

TEST(Cli, BadSoftcapNamesTheOption) {
  for (const std::string bad : {"-1", "nan", "inf", "x", "2y"})
    for (const std::string cmd : {"accuracy --device cpu --seq 64", "bench"})
      expect_usage_error(cmd + " --softcap " + bad, "--softcap: expected a finite number >= 0 (0: none), got '" + bad + "'");
}

TEST(Cli, DeviceGpuWithoutGpuFails) {
  if (device_info(0).present) GTEST_SKIP() << "a GPU is present";
  CliResult r = run_cli("demo --device gpu");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("GPU"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace intfa::testing

#endif  // INTFA_CLI_PATH
