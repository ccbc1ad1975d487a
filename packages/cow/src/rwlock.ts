/**
 * RwLock: many readers or one writer, granted in arrival order (a writer waits for the readers
 * before it; readers after a waiting writer wait for it), so neither side starves.
 *
 * Cow holds it shared for reads and exclusively for a transaction. That is what makes freeing
 * and reusing Grass addresses safe: no reader can be halfway down a path whose records a
 * transaction frees and hands to something else.
 */
interface Waiter {
  write: boolean;
  grant: () => void;
}

export class RwLock {
  private readers = 0;
  private writer = false;
  private readonly queue: Waiter[] = [];
  private noWriterWaiters: (() => void)[] = [];

  async read<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(false);
    try {
      return await fn();
    } finally {
      this.releaseRead();
    }
  }

  async write<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(true);
    try {
      return await fn();
    } finally {
      this.writer = false;
      // Every release wakes them, even one that hands the lock straight to the next writer:
      // each wake is one of their bounded tries, so a stream of writers cannot keep them
      // waiting for ever (they find the lock held again, and in the end queue as writers).
      this.wakeNoWriter();
      this.pump();
    }
  }

  /** Whether a writer holds the lock now. */
  get writing(): boolean {
    return this.writer;
  }

  /**
   * Resolves once no writer holds the lock (at once if none does) or a writer has released it,
   * for callers that do their work synchronously without taking it. It does not queue: the
   * next writer may hold the lock again by the time the caller runs, so the caller must bound
   * its retries.
   */
  noWriter(): Promise<void> {
    if (!this.writer) return Promise.resolve();
    return new Promise((resolve) => this.noWriterWaiters.push(resolve));
  }

  private wakeNoWriter(): void {
    const w = this.noWriterWaiters;
    if (w.length === 0) return;
    this.noWriterWaiters = [];
    for (const f of w) f();
  }

  /** Take a read share only if that needs no waiting; pair with releaseRead(). */
  tryRead(): boolean {
    if (this.queue.length > 0 || this.writer) return false;
    this.readers++;
    return true;
  }

  releaseRead(): void {
    this.readers--;
    this.pump();
  }

  private acquire(write: boolean): Promise<void> {
    if (this.queue.length === 0 && !this.writer && (!write || this.readers === 0)) {
      if (write) this.writer = true;
      else this.readers++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.queue.push({ write, grant: resolve }));
  }

  private pump(): void {
    while (this.queue.length > 0 && !this.writer) {
      const head = this.queue[0]!;
      if (head.write) {
        if (this.readers > 0) return;
        this.queue.shift();
        this.writer = true;
        head.grant();
        return;
      }
      this.queue.shift();
      this.readers++;
      head.grant();
    }
  }
}
