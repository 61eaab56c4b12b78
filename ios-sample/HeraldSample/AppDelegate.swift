import UIKit
import UserNotifications

/// APNs registration and remote-notification entry points, forwarded to the controller.
final class AppDelegate: NSObject, UIApplicationDelegate, UNUserNotificationCenterDelegate {
    let controller = HeraldController()

    func application(
        _ application: UIApplication,
        didFinishLaunchingWithOptions launchOptions: [UIApplication.LaunchOptionsKey: Any]? = nil
    ) -> Bool {
        UNUserNotificationCenter.current().delegate = self
        UNUserNotificationCenter.current().requestAuthorization(options: [.alert, .badge, .sound]) { _, _ in }
        // Background (content-available) pushes need no permission; the token is the same.
        application.registerForRemoteNotifications()
        return true
    }

    func application(_ application: UIApplication, didRegisterForRemoteNotificationsWithDeviceToken deviceToken: Data) {
        controller.apnsTokenReceived(deviceToken)
    }

    func application(_ application: UIApplication, didFailToRegisterForRemoteNotificationsWithError error: Error) {
        controller.apnsRegistrationFailed(error)
    }

    /// Background pushes (data-only messages and sync hints: `content-available: 1`).
    func application(
        _ application: UIApplication,
        didReceiveRemoteNotification userInfo: [AnyHashable: Any],
        fetchCompletionHandler completionHandler: @escaping (UIBackgroundFetchResult) -> Void
    ) {
        controller.handlePush(userInfo) { outcome in
            switch outcome {
            case let .herald(newMessages):
                completionHandler(newMessages > 0 ? .newData : .noData)
            case .foreign:
                completionHandler(.noData)
            case .failed:
                completionHandler(.failed)
            }
        }
    }

    /// An alert push while the app is in the foreground: the live connection usually
    /// delivered the message already (then handlePush returns nothing and no banner is
    /// shown); otherwise it is added to the list and shown.
    func userNotificationCenter(
        _ center: UNUserNotificationCenter,
        willPresent notification: UNNotification,
        withCompletionHandler completionHandler: @escaping (UNNotificationPresentationOptions) -> Void
    ) {
        controller.handlePush(notification.request.content.userInfo) { outcome in
            switch outcome {
            case let .herald(newMessages):
                completionHandler(newMessages > 0 ? [.banner, .list, .sound] : [])
            case .foreign, .failed:
                completionHandler([.banner, .list, .sound])
            }
        }
    }
}
