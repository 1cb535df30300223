// `model.safetensors.index.json`: tensor name -> shard file, validated before any shard is opened.
#pragma once

#include <map>
#include <string>

namespace pysafe {

/// A validated shard index. Shard names are plain file names (no directories, no '..').
struct ShardIndex {
  std::map<std::string, std::string> weight_map;  ///< tensor name -> shard file name
  std::map<std::string, std::string> metadata;    ///< scalar metadata entries, stringified
};

/// Parse and validate an index file. Errors are ShardIndexError naming the file and the entry.
ShardIndex parse_shard_index(const std::string& path);

}  // namespace pysafe
