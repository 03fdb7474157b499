// How the slot protocol fails: loudly, naming the peer and the ring step, and on every rank of
// the ring (the first failure is written into both of its links, and whoever reads it passes it
// on), because a rank that merely stopped would leave its neighbours spinning until a timeout.
#include <signal.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "ring/slot_ring.h"

namespace parallelkit {
namespace {

// Whether `pid` still runs. A dead child its parent has not reaped yet is a zombie, which kill()
// still finds: read its state too.
bool alive(int64_t pid) {
  if (pid <= 0) return true;  // unknown
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;
  const auto paren = line.rfind(')');
  const char state = paren != std::string::npos && paren + 2 < line.size() ? line[paren + 2] : 'R';
  return state != 'Z' && state != 'X';
}

void mark_aborted(ChannelHeader* link, int64_t rank, const std::string& reason) {
  if (link == nullptr) return;
  int32_t expected = 0;
  if (!link->abort_state.compare_exchange_strong(expected, 1)) return;  // the first reason wins
  link->aborted_by = static_cast<int32_t>(rank);
  const size_t n = std::min(reason.size(), sizeof(link->abort_reason) - 1);
  std::memcpy(link->abort_reason, reason.data(), n);
  link->abort_reason[n] = '\0';
  link->abort_state.store(2, std::memory_order_release);
}

}  // namespace

// The links carry the first failure's rank and message, not ours: the cause stays readable
// however far round the ring it travels.
void SlotRing::fail(const std::string& why, int64_t first_rank, const std::string& first_reason) {
  std::ostringstream text;
  text << "ring transport " << name() << " on rank " << ring_.rank << ": " << why;
  broken_ = text.str();
  const bool first = first_rank < 0;
  mark_aborted(own_, first ? ring_.rank : first_rank, first ? broken_ : first_reason);
  mark_aborted(next_, first ? ring_.rank : first_rank, first ? broken_ : first_reason);
  TORCH_CHECK(false, broken_);
}

void SlotRing::check_aborted(const std::string& doing) {
  for (ChannelHeader* link : {own_, next_}) {
    if (link->abort_state.load(std::memory_order_acquire) == 2 && link->aborted_by != ring_.rank) {
      const std::string reason = link->abort_reason;
      fail("rank " + std::to_string(link->aborted_by) + " stopped the ring, so this rank stops "
           "too, while " + doing + ". Its error: " + reason, link->aborted_by, reason);
    }
  }
}

void SlotRing::check_fragment(const Message& message, uint64_t fragment, uint64_t seen) {
  const Published& published = own_->published[fragment % static_cast<uint64_t>(options_.slots)];
  const uint64_t exchange = published.exchange.load(std::memory_order_relaxed);
  const uint64_t bytes = published.message_bytes.load(std::memory_order_relaxed);
  std::ostringstream why;
  if (seen != fragment + 1) {
    why << prev_.label << " overwrote fragment " << fragment << " (ring step " << message.tag
        << ") in this rank's receive slot with fragment " << seen - 1 << " before it was read: "
        << "the sender did not wait for the slot to be free (back-pressure)";
  } else if (exchange != message.exchange) {
    why << prev_.label << " sent fragment " << fragment << " as part of its exchange " << exchange
        << ", but this rank is receiving exchange " << message.exchange << " (ring step "
        << message.tag << "): the ranks started different sequences of ring exchanges";
  } else if (bytes != static_cast<uint64_t>(message.bytes)) {
    why << prev_.label << " (the previous rank in the ring) sent " << bytes << " bytes at ring "
        << "step " << message.tag << " (exchange " << message.exchange << ") but this rank "
        << "receives " << message.bytes << ": the ranks' buffers differ in shape or dtype";
  } else {
    return;
  }
  fail(why.str());
}

void SlotRing::check_stalled(uint64_t exchange, double stalled_s) {
  check_aborted(describe_wait(exchange));
  for (const auto& [peer, where] : {std::pair{&prev_, "previous"}, std::pair{&next_peer_, "next"}}) {
    if (!alive(peer->pid)) {
      fail(peer->label + " (pid " + std::to_string(peer->pid) + "), the " + where + " rank in the " +
           "ring, has exited; this rank was " + describe_wait(exchange));
    }
  }
  if (stalled_s > options_.timeout_s) {
    std::ostringstream why;
    why << "no progress for " << stalled_s << " s while " << describe_wait(exchange) << "; that "
        << "rank is stuck, or ran a different sequence of ring ops (the timeout is "
        << options_.timeout_s << " s: PARALLELKIT_RING_TIMEOUT_S)";
    fail(why.str());
  }
}

std::string SlotRing::describe_wait(uint64_t exchange) const {
  std::ostringstream text;
  const auto slots = static_cast<uint64_t>(options_.slots);
  if (!sends_.empty() && sends_.front().exchange <= exchange) {
    const Message& message = sends_.front();
    text << "waiting for " << next_peer_.label << " (the next rank in the ring) to read fragment "
         << send_fragment_ - slots << " out of its receive slot " << send_fragment_ % slots
         << " before this rank overwrites that slot with ring step " << message.tag
         << " (exchange " << message.exchange << ")";
  } else if (!receives_.empty()) {
    const Message& message = receives_.front();
    text << "waiting for " << prev_.label << " (the previous rank in the ring) to send ring step "
         << message.tag << " (exchange " << message.exchange << ", fragment " << receive_fragment_
         << ")";
  } else {
    text << "finishing exchange " << exchange;
  }
  return text.str();
}

}  // namespace parallelkit
