#include "net/progress.h"

#include <cerrno>
#include <cstring>

#include <pthread.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/logging.h"
#include "common/utils.h"

namespace tcpx {

namespace {
thread_local int tThreadIndex = -1;
thread_local const ProgressEngine* tEngine = nullptr;
}  // namespace

struct ProgressEngine::Thread {
  int index = 0;
  int epfd = -1;
  int wakeFd = -1;
  std::thread thread;
  std::atomic<bool> stop{false};

  std::mutex mu;  // guards tasks and tickers
  struct Task {
    std::function<void()> fn;
    bool done = false;
  };
  std::deque<std::shared_ptr<Task>> tasks;
  std::condition_variable taskDone;
  struct Ticker {
    int id;
    int periodMs;
    Clock::time_point next;
    std::function<void()> fn;
  };
  std::vector<Ticker> tickers;
  int nextTickerId = 1;

  std::vector<PollHandler*> deferred;  // owned by the thread itself

  void wake() {
    uint64_t one = 1;
    ssize_t r = write(wakeFd, &one, sizeof(one));
    (void)r;  // a full eventfd counter still wakes the thread
  }
};

// A sentinel whose address marks the eventfd in epoll_event.data.ptr.
static PollHandler* const kWakeMarker = reinterpret_cast<PollHandler*>(uintptr_t{1});

ProgressEngine::ProgressEngine(int nthreads) {
  for (int i = 0; i < nthreads; i++) {
    auto th = std::make_unique<Thread>();
    th->index = i;
    th->epfd = epoll_create1(EPOLL_CLOEXEC);
    th->wakeFd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (th->epfd < 0 || th->wakeFd < 0) {
      TCPX_WARN("progress thread %d: epoll/eventfd creation failed: %s", i, strerror(errno));
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = kWakeMarker;
    epoll_ctl(th->epfd, EPOLL_CTL_ADD, th->wakeFd, &ev);
    threads_.push_back(std::move(th));
  }
  for (auto& th : threads_) {
    Thread* raw = th.get();
    raw->thread = std::thread([this, raw] { loop(raw); });
  }
}

ProgressEngine::~ProgressEngine() {
  for (auto& th : threads_) {
    th->stop = true;
    th->wake();
  }
  for (auto& th : threads_) {
    if (th->thread.joinable()) th->thread.join();
    for (PollHandler* h : th->deferred) delete h;
    close(th->epfd);
    close(th->wakeFd);
  }
}

int ProgressEngine::pickThread() {
  return static_cast<int>(next_.fetch_add(1) % threads_.size());
}

tcpxResult_t ProgressEngine::add(int t, int fd, PollHandler* h, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.ptr = h;
  TCPX_SYSCHECK(epoll_ctl(threads_[t]->epfd, EPOLL_CTL_ADD, fd, &ev), "epoll_ctl(ADD)");
  return tcpxSuccess;
}

tcpxResult_t ProgressEngine::modify(int t, int fd, PollHandler* h, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.ptr = h;
  TCPX_SYSCHECK(epoll_ctl(threads_[t]->epfd, EPOLL_CTL_MOD, fd, &ev), "epoll_ctl(MOD)");
  return tcpxSuccess;
}

void ProgressEngine::removeFd(int t, int fd) {
  epoll_ctl(threads_[t]->epfd, EPOLL_CTL_DEL, fd, nullptr);
}

bool ProgressEngine::onThread(int* t) const {
  if (tEngine != this) return false;
  if (t) *t = tThreadIndex;
  return true;
}

void ProgressEngine::runOn(int t, std::function<void()> fn) {
  int self;
  if (onThread(&self) && self == t) {
    fn();
    return;
  }
  Thread* th = threads_[t].get();
  auto task = std::make_shared<Thread::Task>();
  task->fn = std::move(fn);
  std::unique_lock<std::mutex> lk(th->mu);
  th->tasks.push_back(task);
  th->wake();
  th->taskDone.wait(lk, [&] { return task->done; });
}

void ProgressEngine::deferDelete(int t, PollHandler* h) { threads_[t]->deferred.push_back(h); }

int ProgressEngine::addTicker(int t, int periodMs, std::function<void()> fn) {
  Thread* th = threads_[t].get();
  std::lock_guard<std::mutex> lk(th->mu);
  int id = th->nextTickerId++;
  th->tickers.push_back(
      {id, periodMs, Clock::now() + std::chrono::milliseconds(periodMs), std::move(fn)});
  th->wake();
  return id;
}

void ProgressEngine::removeTicker(int t, int id) {
  // Through runOn so that a ticker running right now has finished when this returns.
  Thread* th = threads_[t].get();
  runOn(t, [th, id] {
    std::lock_guard<std::mutex> lk(th->mu);
    for (size_t i = 0; i < th->tickers.size(); i++) {
      if (th->tickers[i].id == id) {
        th->tickers.erase(th->tickers.begin() + static_cast<long>(i));
        break;
      }
    }
  });
}

void ProgressEngine::loop(Thread* th) {
  char name[16];
  snprintf(name, sizeof(name), "tcpx-net%d", th->index);
  pthread_setname_np(pthread_self(), name);
  tThreadIndex = th->index;
  tEngine = this;
  constexpr int kMaxEvents = 64;
  epoll_event events[kMaxEvents];
  while (!th->stop.load(std::memory_order_relaxed)) {
    int timeoutMs = -1;
    {
      std::lock_guard<std::mutex> lk(th->mu);
      if (!th->tickers.empty()) {
        auto now = Clock::now();
        int64_t best = INT64_MAX;
        for (auto& tk : th->tickers) {
          best = std::min<int64_t>(
              best, std::chrono::duration_cast<std::chrono::milliseconds>(tk.next - now).count());
        }
        timeoutMs = static_cast<int>(std::max<int64_t>(0, best));
      }
      if (!th->tasks.empty()) timeoutMs = 0;
    }
    int n = epoll_wait(th->epfd, events, kMaxEvents, timeoutMs);
    if (n < 0 && errno != EINTR) {
      TCPX_WARN("progress thread %d: epoll_wait failed: %s", th->index, strerror(errno));
    }
    for (int i = 0; i < n; i++) {
      PollHandler* h = static_cast<PollHandler*>(events[i].data.ptr);
      if (h == kWakeMarker) {
        uint64_t v;
        while (read(th->wakeFd, &v, sizeof(v)) > 0) {
        }
        continue;
      }
      h->onEvents(events[i].events);
    }
    // End of a batch: no event of this batch refers to anything removed now.
    for (PollHandler* h : th->deferred) delete h;
    th->deferred.clear();

    std::deque<std::shared_ptr<Thread::Task>> tasks;
    std::vector<std::function<void()>*> due;
    {
      std::lock_guard<std::mutex> lk(th->mu);
      tasks.swap(th->tasks);
    }
    for (auto& task : tasks) {
      task->fn();
      std::lock_guard<std::mutex> lk(th->mu);
      task->done = true;
    }
    if (!tasks.empty()) th->taskDone.notify_all();
    for (PollHandler* h : th->deferred) delete h;
    th->deferred.clear();

    // Tickers run unlocked: they may call back into the engine (runOn is not
    // allowed from them, modify/add are).
    std::vector<std::function<void()>> toRun;
    {
      std::lock_guard<std::mutex> lk(th->mu);
      auto now = Clock::now();
      for (auto& tk : th->tickers) {
        if (tk.next <= now) {
          tk.next = now + std::chrono::milliseconds(tk.periodMs);
          toRun.push_back(tk.fn);
        }
      }
    }
    for (auto& fn : toRun) fn();
  }
}

}  // namespace tcpx
