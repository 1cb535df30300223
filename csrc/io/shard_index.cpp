#include "io/shard_index.h"

#include <fstream>
#include <sstream>

#include "core/error.h"
#include "io/json.h"

namespace pysafe {

ShardIndex parse_shard_index(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  PYSAFE_CHECK(f.good(), FileNotFound, "not_found", path, ": no such file");
  std::stringstream ss;
  ss << f.rdbuf();
  std::string text = ss.str();
  PYSAFE_CHECK(text.size() <= 512ull * 1024 * 1024, ShardIndex, "index_too_large", path, ": index is ",
               text.size(), " bytes, above the 512 MiB cap");
  PYSAFE_CHECK(json::is_valid_utf8(text.data(), text.size()), ShardIndex, "invalid_utf8", path,
               ": index is not valid UTF-8");
  json::Value root;
  json::ParseError err;
  PYSAFE_CHECK(json::parse(text.data(), text.size(), root, err), ShardIndex, "invalid_json", path,
               ": index is not valid JSON: ", err.what, " at byte ", err.offset);
  PYSAFE_CHECK(root.type == json::Type::Object, ShardIndex, "not_object", path,
               ": index must be a JSON object, found a JSON ", json::type_name(root.type));
  const json::Value* wm = root.find("weight_map");
  PYSAFE_CHECK(wm != nullptr, ShardIndex, "no_weight_map", path, ": index has no 'weight_map'");
  PYSAFE_CHECK(wm->type == json::Type::Object, ShardIndex, "bad_weight_map", path,
               ": 'weight_map' must be an object of tensor name -> shard file, found a JSON ",
               json::type_name(wm->type));
  ShardIndex idx;
  for (auto& kv : wm->object) {
    PYSAFE_CHECK(kv.second.type == json::Type::String, ShardIndex, "bad_weight_map", path, ": weight_map['",
                 printable(kv.first), "'] must be a shard file name, found a JSON ", json::type_name(kv.second.type));
    const std::string& shard = kv.second.string;
    PYSAFE_CHECK(!shard.empty() && shard.find('/') == std::string::npos && shard.find('\\') == std::string::npos &&
                     shard != "." && shard != "..",
                 ShardIndex, "bad_shard_name", path, ": weight_map['", printable(kv.first), "'] names shard '", printable(shard),
                 "'; expected a plain file name in the checkpoint directory");
    idx.weight_map[kv.first] = shard;
  }
  if (const json::Value* md = root.find("metadata")) {
    if (md->type == json::Type::Object)
      for (auto& kv : md->object) {
        if (kv.second.type == json::Type::String) idx.metadata[kv.first] = kv.second.string;
        else if (kv.second.type == json::Type::Number)
          idx.metadata[kv.first] = kv.second.is_uint ? std::to_string(kv.second.uint) : std::to_string(kv.second.number);
      }
  }
  return idx;
}

}  // namespace pysafe
